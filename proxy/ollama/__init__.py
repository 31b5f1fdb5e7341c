"""Ollama's API over the engine's OpenAI API, translated event by event (routes in ``api.py``)."""
