"""The engine's models as Ollama clients see them: names with tags, thinking aliases, details and capabilities.

Everything comes from the engine itself: ``/v1/models`` for the names and context length, ``/tokenize`` to learn
whether the chat template honours ``enable_thinking`` and ``tools``, and, when the model folder is on this
machine, its ``config.json`` and weight files for the family, size and parameter count.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from math import prod
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from flushgate.proxy.ollama.errors import OllamaError, engine_error_message
from flushgate.proxy.ollama.settings import OllamaSettings
from flushgate.proxy.state import Gateway

DEFAULT_TAG = "latest"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
_PROBE_TIMEOUT = aiohttp.ClientTimeout(total=10)


@dataclass(frozen=True, slots=True)
class ModelDetails:
    """Ollama's ``details`` object; empty strings where the engine's folder is not on this machine."""

    family: str = ""
    format: str = ""
    parameter_size: str = ""
    quantization_level: str = ""
    size: int = 0
    digest: str = ""
    modified_at: str = ""
    architecture: str = ""
    parameter_count: int = 0

    def as_ollama(self) -> dict[str, Any]:
        return {
            "parent_model": "",
            "format": self.format,
            "family": self.family,
            "families": [self.family] if self.family else [],
            "parameter_size": self.parameter_size,
            "quantization_level": self.quantization_level,
        }


@dataclass(frozen=True, slots=True)
class ServedModel:
    id: str
    root: str | None
    max_model_len: int | None
    details: ModelDetails
    thinking: bool  # the chat template renders differently with enable_thinking on and off
    tools: bool  # the chat template renders the tools it is given

    @property
    def capabilities(self) -> list[str]:
        caps = ["completion"]
        if self.tools:
            caps.append("tools")
        if self.thinking:
            caps.append("thinking")
        return caps


@dataclass(frozen=True, slots=True)
class ModelChoice:
    """A client's model name resolved: the engine's model, and the thinking mode its alias asks for."""

    model: ServedModel
    name: str  # as the client wrote it; echoed in every answer
    thinking: bool | None


@dataclass(frozen=True, slots=True)
class ListedName:
    name: str
    model: ServedModel
    thinking: bool | None


def ollama_name(model_id: str, tag: str = DEFAULT_TAG) -> str:
    """``qwen3`` -> ``qwen3:latest``; an id that already carries a tag keeps it and gets ``-TAG`` for aliases."""
    if ":" in model_id.rsplit("/", 1)[-1]:
        return model_id if tag == DEFAULT_TAG else f"{model_id}-{tag}"
    return f"{model_id}:{tag}"


def listed_names(model: ServedModel, aliases: Mapping[str, bool]) -> list[ListedName]:
    names = [ListedName(ollama_name(model.id), model, None)]
    if model.thinking:
        names += [ListedName(ollama_name(model.id, tag), model, on) for tag, on in aliases.items()]
    return names


@dataclass(slots=True)
class ModelRegistry:
    gateway: Gateway
    _models: list[ServedModel] = field(default_factory=list)
    _fetched_at: float = float("-inf")
    _known: dict[tuple[str, str | None], ServedModel] = field(default_factory=dict)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def settings(self) -> OllamaSettings:
        return self.gateway.ollama

    async def models(self, *, fresh: bool = False) -> list[ServedModel]:
        if not fresh and time.monotonic() - self._fetched_at < self.settings.model_list_max_age_s:
            return self._models
        async with self._lock:
            if fresh or time.monotonic() - self._fetched_at >= self.settings.model_list_max_age_s:
                self._models = await self._fetch()
                self._fetched_at = time.monotonic()
        return self._models

    async def names(self) -> list[ListedName]:
        aliases = self.settings.thinking_aliases
        return [name for model in await self.models() for name in listed_names(model, aliases)]

    async def resolve(self, name: str) -> ModelChoice:
        """The served model a client means by ``name``; 404 in Ollama's words if there is none.

        A name missing from a cached list is looked up once more in a fresh one, in case the engine changed.
        """
        for fresh in (False, True):
            if fresh:
                await self.models(fresh=True)
            for listed in await self.names():
                if name == listed.name or (listed.thinking is None and name == listed.model.id):
                    return ModelChoice(listed.model, name, listed.thinking)
        raise OllamaError(404, f"model '{name}' not found")

    async def _fetch(self) -> list[ServedModel]:
        gateway = self.gateway
        refusal = gateway.refusal()
        if refusal is not None:
            raise OllamaError(503, refusal.message, {"Retry-After": str(refusal.retry_after_s)})
        base = gateway.backend.base_url
        try:
            async with gateway.session.get(base + "/v1/models", timeout=_PROBE_TIMEOUT) as resp:
                body = await resp.read()
                if resp.status != 200:
                    raise OllamaError(
                        502, f"the engine at {base} did not list its models: {engine_error_message(body)}"
                    )
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise OllamaError(502, f"the engine at {base} is unreachable: {exc or type(exc).__name__}") from None
        try:
            cards = orjson.loads(body)["data"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            raise OllamaError(502, f"the engine at {base} sent a model list that is not OpenAI's") from None
        models = []
        for card in cards:
            if not isinstance(card, dict) or not isinstance(card.get("id"), str):
                continue
            key = (card["id"], card.get("root"))
            known = self._known.get(key)
            if known is None:
                known = await self._describe(card)
                self._known[key] = known
            models.append(known)
        return models

    async def _describe(self, card: dict[str, Any]) -> ServedModel:
        model_id: str = card["id"]
        root = card.get("root") if isinstance(card.get("root"), str) else None
        max_len = card.get("max_model_len") if isinstance(card.get("max_model_len"), int) else None
        details = await asyncio.to_thread(local_details, model_id, root)
        thinking, tools = await asyncio.gather(
            self._template_varies(model_id, "thinking"), self._template_varies(model_id, "tools")
        )
        return ServedModel(model_id, root, max_len, details, thinking, tools)

    async def _template_varies(self, model_id: str, what: str) -> bool:
        """Render a one-line chat both ways through the engine's ``/tokenize``; a difference is the capability."""
        base: dict[str, Any] = {
            "model": model_id,
            "messages": [{"role": "user", "content": "hi"}],
            "add_generation_prompt": True,
        }
        variants: list[dict[str, Any]]
        if what == "thinking":
            variants = [{"chat_template_kwargs": {"enable_thinking": on}} for on in (True, False)]
        else:
            tool = {
                "type": "function",
                "function": {"name": "probe", "parameters": {"type": "object", "properties": {}}},
            }
            variants = [{}, {"tools": [tool]}]
        rendered: list[object] = []
        for extra in variants:
            try:
                async with self.gateway.session.post(
                    self.gateway.backend.base_url + "/tokenize",
                    data=orjson.dumps(base | extra),
                    headers={"Content-Type": "application/json"},
                    timeout=_PROBE_TIMEOUT,
                ) as resp:
                    if resp.status != 200:
                        return False
                    rendered.append(orjson.loads(await resp.read()).get("tokens"))
            except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError, AttributeError):
                return False
        return rendered[0] != rendered[1]


def local_details(model_id: str, root: str | None) -> ModelDetails:
    """What the model folder says about itself, when it is a folder on this machine."""
    folder = Path(root) if root else None
    identity = hashlib.sha256(f"{model_id}\0{root}".encode())
    if folder is None or not (folder / "config.json").is_file():
        return ModelDetails(digest=identity.hexdigest())
    config_bytes = (folder / "config.json").read_bytes()
    identity.update(config_bytes)
    try:
        config = json.loads(config_bytes)
    except ValueError:
        config = {}
    weights = sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    params = sum(_safetensors_parameters(p) for p in weights if p.suffix == ".safetensors")
    architectures = config.get("architectures") or [""]
    return ModelDetails(
        family=str(config.get("model_type", "")),
        format="gguf" if any(p.suffix == ".gguf" for p in weights) else "safetensors",
        parameter_size=_human_count(params) if params else "",
        quantization_level=_quantization(config),
        size=sum(p.stat().st_size for p in weights),
        digest=identity.hexdigest(),
        modified_at=_iso(datetime.fromtimestamp((folder / "config.json").stat().st_mtime, UTC)),
        architecture=str(config.get("model_type", "") or architectures[0]),
        parameter_count=params,
    )


def _safetensors_parameters(path: Path) -> int:
    """Element count from a safetensors header (8-byte length, then JSON); the tensors themselves are not read."""
    try:
        with path.open("rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(length))
    except (OSError, ValueError, struct.error):
        return 0
    return sum(prod(t["shape"]) for name, t in header.items() if name != "__metadata__" and "shape" in t)


def _human_count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}" if n < 10 * size else f"{n / size:.0f}{unit}"
    return str(n)


_DTYPE_LEVELS = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


def _quantization(config: dict[str, Any]) -> str:
    quant = config.get("quantization_config")
    if isinstance(quant, dict) and quant.get("quant_method"):
        return str(quant["quant_method"]).upper()
    dtype = config.get("torch_dtype") or config.get("dtype")
    return _DTYPE_LEVELS.get(str(dtype), str(dtype or "").upper())


def _iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")
