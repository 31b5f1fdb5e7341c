"""flushgate: a low-latency streaming gateway for LLM chat serving."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
