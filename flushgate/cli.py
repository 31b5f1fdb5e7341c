"""Command line: ``flushgate serve``. Every flag also reads a ``FLUSHGATE_*`` environment variable."""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from flushgate import __version__
from flushgate.cli_engines import (
    RepeatableFlag,
    add_managed_engine_flags,
    add_routing_flags,
    routing_from_args,
    upstream_from_args,
    url_list,
)
from flushgate.config import (
    ATTACHED_KEEPALIVE_S,
    ENGINE_KEEPALIVE_ENV,
    MANAGED_KEEPALIVE_S,
    Access,
    Config,
    ConfigError,
    Limits,
    Timeouts,
    engine_keepalive,
    read_key_file,
)
from flushgate.doctor.cli import add_doctor_parser, run_doctor
from flushgate.engine.presets import PRESETS
from flushgate.logs import configure
from flushgate.workers import WORKER_INDEX_FLAG, WORKER_METRICS_FLAG

T = TypeVar("T")


def _env(name: str, default: T, convert: Callable[[str], T]) -> T:
    raw = os.environ.get("FLUSHGATE_" + name)
    if raw is None or raw == "":
        return default
    try:
        return convert(raw)
    except ValueError as exc:
        raise SystemExit(f"flushgate: FLUSHGATE_{name}={raw!r} is not valid: {exc}") from None


def _seconds_or_off(raw: str) -> float | None:
    value = float(raw)
    return None if value == 0 else value


def _bool(raw: str) -> bool:
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


_no_args: list[str] = []


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flushgate",
        description="A low-latency streaming gateway for LLM chat serving, in front of vLLM.",
    )
    parser.add_argument("--version", action="version", version=f"flushgate {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="run the gateway",
        description=(
            "Run the gateway. Either manage a vLLM engine (--model DIR, started as a child process on a private "
            "port) or attach to a running one (--upstream URL). Each flag can also be set with the environment "
            "variable named in its help, e.g. FLUSHGATE_PORT=9000."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    defaults = Timeouts()
    serve.add_argument(
        "--upstream",
        action=RepeatableFlag,
        default=_env("UPSTREAM", None, url_list),
        metavar="URL",
        help="engine to forward to, e.g. http://127.0.0.1:8001; repeat it for several engines "
        "(FLUSHGATE_UPSTREAM, several separated by commas)",
    )
    engine = serve.add_argument_group("managed engine (with --model)")
    engine.add_argument(
        "--model",
        default=_env("MODEL", None, str),
        metavar="DIR",
        help="model folder (or hub id) for a managed vLLM engine (FLUSHGATE_MODEL)",
    )
    engine.add_argument(
        "--preset",
        default=_env("PRESET", None, str),
        choices=sorted(PRESETS),
        help="named engine set-up, see README (FLUSHGATE_PRESET)",
    )
    engine.add_argument(
        "--engine-arg",
        dest="engine_args",
        action="append",
        metavar="ARGS",
        default=_env("ENGINE_ARGS", _no_args, lambda raw: [raw]),
        help="extra vLLM arguments, passed through untouched; repeatable, each value split like a "
        "shell line, e.g. --engine-arg='--max-num-seqs 64' (FLUSHGATE_ENGINE_ARGS)",
    )
    engine.add_argument(
        "--served-model-name",
        default=_env("SERVED_MODEL_NAME", None, str),
        metavar="NAME",
        help="model name clients use; default: the model folder's name (FLUSHGATE_SERVED_MODEL_NAME)",
    )
    engine.add_argument(
        "--engine-python",
        default=_env("ENGINE_PYTHON", None, str),
        metavar="PATH",
        help="Python interpreter with vLLM installed; default: flushgate's own (FLUSHGATE_ENGINE_PYTHON)",
    )
    engine.add_argument(
        "--engine-grace",
        type=float,
        default=_env("ENGINE_GRACE", 15.0, float),
        metavar="S",
        help="on shutdown, seconds the engine gets after SIGTERM before SIGKILL (FLUSHGATE_ENGINE_GRACE)",
    )
    engine.add_argument(
        "--engine-log",
        default=_env("ENGINE_LOG", None, str),
        metavar="FILE",
        help="with console logs, the file for the engine's own lines; default "
        ".cache/flushgate/engine.log (FLUSHGATE_ENGINE_LOG)",
    )
    add_managed_engine_flags(engine, _env)
    serve.add_argument(
        "--host",
        default=_env("HOST", "127.0.0.1", str),
        help="address to listen on; 0.0.0.0 for all interfaces (FLUSHGATE_HOST)",
    )
    serve.add_argument("--port", type=int, default=_env("PORT", 8000, int), help="port to listen on (FLUSHGATE_PORT)")
    serve.add_argument(
        "--workers",
        type=int,
        default=_env("WORKERS", 1, int),
        metavar="N",
        help="run N gateway processes on the port (SO_REUSEPORT; the kernel spreads connections over them), for "
        "more than one core's worth of streams; each has its own records, and /metrics answers for all of them, "
        "every series labelled worker. Only with --upstream or --upstream-dns (FLUSHGATE_WORKERS)",
    )
    serve.add_argument(WORKER_INDEX_FLAG, type=int, default=None, help=argparse.SUPPRESS)  # set by --workers
    serve.add_argument(WORKER_METRICS_FLAG, default=None, help=argparse.SUPPRESS)  # set by --workers
    serve.add_argument(
        "--connect-timeout",
        type=float,
        metavar="S",
        default=_env("CONNECT_TIMEOUT", defaults.connect, float),
        help="seconds to open a connection to the engine; then 504 (FLUSHGATE_CONNECT_TIMEOUT)",
    )
    serve.add_argument(
        "--engine-keepalive",
        type=float,
        metavar="S",
        default=_env("ENGINE_KEEPALIVE", None, float),
        help="seconds an idle connection to an engine is kept for the next request; it must end before the "
        f"engine's own idle time does. Default: {ATTACHED_KEEPALIVE_S:g} with --upstream/--upstream-dns (vLLM "
        f"closes idle connections after 5 s), {MANAGED_KEEPALIVE_S:g} with --model (the engine is started with "
        f"{ENGINE_KEEPALIVE_ENV} one second longer, unless the environment sets it) (FLUSHGATE_ENGINE_KEEPALIVE)",
    )
    serve.add_argument(
        "--idle-timeout",
        type=_seconds_or_off,
        metavar="S",
        default=_env("IDLE_TIMEOUT", defaults.idle, _seconds_or_off),
        help="seconds the engine may stay silent before a stream is ended with an error event; "
        "0 disables (FLUSHGATE_IDLE_TIMEOUT)",
    )
    serve.add_argument(
        "--drain-timeout",
        type=float,
        metavar="S",
        default=_env("DRAIN_TIMEOUT", defaults.drain, float),
        help="on SIGTERM, seconds in-flight requests may take to finish (FLUSHGATE_DRAIN_TIMEOUT)",
    )
    serve.add_argument(
        "--log-format",
        choices=("auto", "json", "console"),
        default=_env("LOG_FORMAT", "auto", str),
        help="auto: readable on a terminal, JSON lines otherwise (FLUSHGATE_LOG_FORMAT)",
    )
    serve.add_argument(
        "--log-content",
        action=argparse.BooleanOptionalAction,
        default=_env("LOG_CONTENT", False, _bool),
        help="put prompts and completions in the per-request record; off, they are never logged "
        "(FLUSHGATE_LOG_CONTENT)",
    )
    serve.add_argument(
        "--hop-timing",
        action=argparse.BooleanOptionalAction,
        default=_env("HOP_TIMING", True, _bool),
        help="per-chunk timestamps for the per-request record and metrics (FLUSHGATE_HOP_TIMING)",
    )
    serve.add_argument(
        "--own-server",
        action=argparse.BooleanOptionalAction,
        default=_env("OWN_SERVER", True, _bool),
        help="answer the OpenAI pass-through's plain POST requests and GET /v1/models on the gateway's own HTTP/1.1 "
        "protocol, which costs less CPU per request than aiohttp's server; --no-own-server: aiohttp's server takes "
        "every request (FLUSHGATE_OWN_SERVER)",
    )
    serve.add_argument(
        "--accept-handles",
        type=int,
        default=_env("ACCEPT_HANDLES", 8, int),
        metavar="N",
        help="with the own server: watch the listening socket with N handles; uvloop accepts one waiting "
        "connection per handle and turn of the event loop, so a burst of new clients is taken N at a time "
        "(1: uvloop's own behaviour) (FLUSHGATE_ACCEPT_HANDLES)",
    )
    serve.add_argument(
        "--timing-summary",
        action=argparse.BooleanOptionalAction,
        default=_env("TIMING_SUMMARY", False, _bool),
        help="end every event stream with a ': flushgate-timing {...}' SSE comment; a client can also ask per "
        "request with the header 'X-Flushgate-Timing: summary' (FLUSHGATE_TIMING_SUMMARY)",
    )
    serve.add_argument(
        "--engine-traces-port",
        type=int,
        default=_env("ENGINE_TRACES_PORT", None, int),
        metavar="PORT",
        help="attach mode: listen on 127.0.0.1:PORT for the engine's OTLP/HTTP spans, for vLLM started with "
        "--otlp-traces-endpoint http://127.0.0.1:PORT/v1/traces and OTEL_EXPORTER_OTLP_TRACES_PROTOCOL="
        "http/protobuf, and join its per-request timing into the record (FLUSHGATE_ENGINE_TRACES_PORT)",
    )
    serve.add_argument(
        "--thinking-aliases",
        default=_env("THINKING_ALIASES", "think=on,nothink=off", str),
        metavar="TAG=on|off,...",
        help="Ollama API: model tags that turn thinking on or off, listed as MODEL:TAG for models whose chat "
        "template honours enable_thinking; empty for none (FLUSHGATE_THINKING_ALIASES)",
    )
    serve.add_argument(
        "--engine-timing",
        action=argparse.BooleanOptionalAction,
        default=_env("ENGINE_TIMING", True, _bool),
        help="managed engine: have vLLM export its per-request timing (queue, prefill, decode) to a private "
        "OTLP receiver and join it into the record (FLUSHGATE_ENGINE_TIMING)",
    )
    add_routing_flags(serve, _env)
    _add_access_and_limit_flags(serve)
    add_doctor_parser(commands)
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    return Config(
        host=args.host,
        port=args.port,
        upstream=upstream_from_args(args),
        upstream_dns=args.upstream_dns,
        engines=args.engines,
        gpus=args.gpus,
        routing=routing_from_args(args),
        model=args.model,
        preset=args.preset,
        engine_args=tuple(arg for value in args.engine_args for arg in shlex.split(value)),
        served_model_name=args.served_model_name,
        engine_python=args.engine_python,
        engine_grace=args.engine_grace,
        engine_log=args.engine_log,
        timeouts=Timeouts(
            connect=args.connect_timeout,
            idle=args.idle_timeout,
            drain=args.drain_timeout,
            engine_keepalive=engine_keepalive(
                args.engine_keepalive, managed=args.model is not None, environ=os.environ
            ),
        ),
        log_format=args.log_format,
        log_content=args.log_content,
        hop_timing=args.hop_timing,
        own_server=args.own_server,
        accept_handles=args.accept_handles,
        timing_summary=args.timing_summary,
        engine_timing=args.engine_timing,
        limits=_limits_from_args(args),
        access=_access_from_args(args),
        thinking_aliases=args.thinking_aliases,
        engine_traces_port=args.engine_traces_port,
        workers=args.workers,
        reuse_port=args.worker_index is not None,
        worker_index=args.worker_index,
        worker_metrics_dir=args.worker_metrics_dir,
    ).validate()


def _run(coro: Any) -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
    else:
        uvloop.run(coro)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "doctor":
        return run_doctor(args)
    try:
        config = config_from_args(args)
    except ConfigError as exc:
        print(f"flushgate: {exc}", file=sys.stderr)
        return 2
    configure(config.log_format, worker=args.worker_index)
    if config.workers > 1:
        from flushgate.workers import run_workers

        given = list(sys.argv[1:] if argv is None else argv)
        return run_workers(given[given.index("serve") + 1 :], config)
    from flushgate.server import serve

    _run(serve(config))
    return 0


def _comma_list(raw: str) -> list[str]:
    return [item.strip() for item in raw.split(",") if item.strip()]


def _add_access_and_limit_flags(serve: argparse.ArgumentParser) -> None:
    limits = Limits()
    access = serve.add_argument_group("access")
    access.add_argument(
        "--api-key",
        dest="api_keys",
        action="append",
        metavar="KEY",
        default=None,
        help="require 'Authorization: Bearer KEY' on every route but /healthz and /readyz; repeatable. The "
        "variable FLUSHGATE_API_KEY takes a comma-separated list; prefer it or --api-key-file, since a key on "
        "the command line is visible to every local user",
    )
    access.add_argument(
        "--api-key-file",
        default=_env("API_KEY_FILE", None, str),
        metavar="FILE",
        help="file of API keys, one per line, # comments allowed (FLUSHGATE_API_KEY_FILE)",
    )
    access.add_argument(
        "--metrics-auth",
        action=argparse.BooleanOptionalAction,
        default=_env("METRICS_AUTH", False, _bool),
        help="with API keys, /metrics needs a key too (FLUSHGATE_METRICS_AUTH)",
    )
    access.add_argument(
        "--allow-route",
        dest="allow_routes",
        action="append",
        metavar="PATH",
        default=_env("ALLOW_ROUTE", _no_args, _comma_list),
        help="also forward this engine route, e.g. /v1/load_lora_adapter; {name} matches one path segment and a "
        "last /* the rest; repeatable. Only inference and listing routes are forwarded otherwise, see README "
        "(FLUSHGATE_ALLOW_ROUTE, comma-separated)",
    )
    access.add_argument(
        "--cors-origin",
        dest="cors_origins",
        action="append",
        metavar="ORIGIN",
        default=_env("CORS_ORIGIN", _no_args, _comma_list),
        help="let browser pages from this origin call the API, e.g. https://chat.example.com, or * for any; "
        "repeatable; none: no cross-origin access (FLUSHGATE_CORS_ORIGIN, comma-separated)",
    )
    bounds = serve.add_argument_group("limits")
    bounds.add_argument(
        "--max-body-bytes",
        type=int,
        metavar="N",
        default=_env("MAX_BODY_BYTES", limits.max_body_bytes, int),
        help="largest request body (by its Content-Length); larger ones get 413; 0 disables (FLUSHGATE_MAX_BODY_BYTES)",
    )
    bounds.add_argument(
        "--max-header-bytes",
        type=int,
        metavar="N",
        default=_env("MAX_HEADER_BYTES", limits.max_header_bytes, int),
        help="longest request target or header line; longer ones get 414 or 431 (FLUSHGATE_MAX_HEADER_BYTES)",
    )
    bounds.add_argument(
        "--max-headers",
        type=int,
        metavar="N",
        default=_env("MAX_HEADERS", limits.max_headers, int),
        help="most header lines in a request; more get 431 (FLUSHGATE_MAX_HEADERS)",
    )
    bounds.add_argument(
        "--header-timeout",
        type=float,
        metavar="S",
        default=_env("HEADER_TIMEOUT", limits.header_timeout, float),
        help="seconds a connection may take to send a request's head, from opening or from the previous "
        "answer; then it is closed (against slowloris; also the keep-alive idle time) (FLUSHGATE_HEADER_TIMEOUT)",
    )
    bounds.add_argument(
        "--body-timeout",
        type=float,
        metavar="S",
        default=_env("BODY_TIMEOUT", limits.body_timeout, float),
        help="longest pause while a request body arrives; then 408, and the engine's request, if open, is closed "
        "(FLUSHGATE_BODY_TIMEOUT)",
    )
    bounds.add_argument(
        "--max-concurrent",
        type=int,
        metavar="N",
        default=_env("MAX_CONCURRENT", limits.max_concurrent, int),
        help="requests in flight at once; beyond it new ones get 429 with Retry-After instead of queueing; "
        "0 disables (FLUSHGATE_MAX_CONCURRENT)",
    )


def _limits_from_args(args: argparse.Namespace) -> Limits:
    return Limits(
        max_body_bytes=args.max_body_bytes,
        max_header_bytes=args.max_header_bytes,
        max_headers=args.max_headers,
        header_timeout=args.header_timeout,
        body_timeout=args.body_timeout,
        max_concurrent=args.max_concurrent,
    )


def _access_from_args(args: argparse.Namespace) -> Access:
    keys = [*_env("API_KEY", _no_args, _comma_list), *(args.api_keys or [])]
    if args.api_key_file:
        keys += read_key_file(args.api_key_file)
    return Access(
        api_keys=tuple(dict.fromkeys(keys)),
        metrics_auth=args.metrics_auth,
        allow_routes=tuple(args.allow_routes),
        cors_origins=tuple(args.cors_origins),
    )
