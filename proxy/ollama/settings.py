"""What an operator can choose about the Ollama API: the thinking aliases and the version it reports."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

DEFAULT_THINKING_ALIASES: Mapping[str, bool] = {"think": True, "nothink": False}

OLLAMA_API_VERSION = "0.12.0"
"""The Ollama release whose API this translation follows; clients compare it to decide which fields to send."""


@dataclass(frozen=True, slots=True)
class OllamaSettings:
    # Tag -> thinking on/off. A model whose chat template honours enable_thinking is also listed as NAME:TAG for
    # each entry, so a UI that only shows a model list can still pick the mode.
    thinking_aliases: Mapping[str, bool] = field(default_factory=lambda: dict(DEFAULT_THINKING_ALIASES))
    api_version: str = OLLAMA_API_VERSION
    # How long the engine's model list is trusted before it is asked again (a name it lacks is always re-asked).
    model_list_max_age_s: float = 5.0
    # The endings that make a model name an alias (``:tag``, ``-tag``), for one ``str.endswith`` per request.
    alias_suffixes: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        suffixes = tuple(f"{sep}{tag}" for tag in self.thinking_aliases for sep in ":-")
        object.__setattr__(self, "alias_suffixes", suffixes)


_ON = frozenset({"on", "true", "1", "yes"})
_OFF = frozenset({"off", "false", "0", "no"})


def parse_thinking_aliases(spec: str) -> dict[str, bool]:
    """``"think=on,nothink=off"`` -> ``{"think": True, "nothink": False}``; an empty string means no aliases."""
    aliases: dict[str, bool] = {}
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        tag, sep, value = item.partition("=")
        tag, value = tag.strip(), value.strip().lower()
        if not sep or not tag or ":" in tag or value not in _ON | _OFF:
            raise ValueError(f"thinking alias {item!r} must look like TAG=on or TAG=off")
        aliases[tag] = value in _ON
    return aliases
