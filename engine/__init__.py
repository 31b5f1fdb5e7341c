"""The vLLM supervisor: starts, watches and stops the engine process. No HTTP serving here."""
