"""``flushgate doctor probe`` and ``flushgate doctor logs``: the command line, registered by flushgate's CLI."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Iterator
from pathlib import Path as FilePath
from typing import Any, cast

import orjson

from flushgate.doctor.logs_report import WORST_KEYS, analyse_lines, render_logs
from flushgate.doctor.probe import DEFAULT_PROMPT, Api, Path, ProbeError, ProbeSettings, probe
from flushgate.doctor.render import render


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return value


def _positive_float(raw: str) -> float:
    value = float(raw)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be more than 0")
    return value


def _header(raw: str) -> tuple[str, str]:
    name, sep, value = raw.partition(":")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected 'Name: value', got {raw!r}")
    return name.strip(), value.strip()


def add_doctor_parser(commands: Any) -> None:
    """Adds ``doctor`` and its two verbs to flushgate's subcommands."""
    doctor = commands.add_parser(
        "doctor",
        help="find the hop that holds a token stream back",
        description="Measure streamed chat answers through several paths, or read the gateway's request records.",
    )
    verbs = doctor.add_subparsers(dest="doctor_command", required=True, metavar="VERB")
    probe_parser = verbs.add_parser(
        "probe",
        help="send streamed chat requests through each path and compare their timing",
        description=(
            "Send the same streamed chat request through each path and compare when the tokens arrive. The first "
            "URL is the reference, normally the engine itself: its cadence is what the others are judged against. "
            "A URL may carry a name (NAME=URL) and a path prefix; the chat endpoint is appended unless present."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    probe_parser.add_argument("url", metavar="URL", help="reference path, e.g. engine=http://127.0.0.1:8001")
    probe_parser.add_argument(
        "--via", action="append", default=[], metavar="URL", help="another path to the same engine; repeatable"
    )
    probe_parser.add_argument("--api", choices=("openai", "ollama"), default="openai", help="which chat API to speak")
    probe_parser.add_argument("--model", help="model to ask for; default: the first one the reference lists")
    probe_parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="the user message")
    probe_parser.add_argument(
        "--header",
        dest="headers",
        type=_header,
        action="append",
        default=[],
        metavar="'NAME: VALUE'",
        help="sent to every path, e.g. 'Authorization: Bearer KEY'; repeatable",
    )
    probe_parser.add_argument("--max-tokens", type=_positive_int, default=128, help="tokens per answer at most")
    probe_parser.add_argument("--requests", type=_positive_int, default=3, help="measured requests per path")
    probe_parser.add_argument("--warmup", type=int, default=1, help="unmeasured short requests per path first")
    probe_parser.add_argument("--timeout", type=_positive_float, default=120.0, metavar="S", help="seconds per request")
    probe_parser.add_argument("--json", action="store_true", help="print the report, arrivals included, as JSON")
    probe_parser.add_argument("--chart", type=FilePath, metavar="FILE", help="also draw a .png or .svg chart")

    logs_parser = verbs.add_parser(
        "logs",
        help="per-stage percentiles, the worst requests and the dominant hop from the gateway's JSON logs",
        description="Read flushgate's JSON log lines (a file, or - for standard input) and summarise its requests.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    logs_parser.add_argument("file", metavar="FILE", help="JSON log lines, or - for standard input")
    logs_parser.add_argument("--worst", type=int, default=5, help="how many of the worst requests to list")
    logs_parser.add_argument("--worst-by", choices=sorted(WORST_KEYS), default="total", help="what makes one worst")
    logs_parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def run_doctor(args: argparse.Namespace) -> int:
    if args.doctor_command == "probe":
        return _run_probe(args)
    return _run_logs(args)


def _fail(message: str) -> int:
    print(f"flushgate doctor: {message}", file=sys.stderr)
    return 2


def _run_probe(args: argparse.Namespace) -> int:
    api = cast(Api, args.api)
    if args.chart is not None and args.chart.suffix.lower() not in (".png", ".svg"):
        return _fail(f"--chart must name a .png or .svg file, not {str(args.chart)!r}")
    try:
        paths = [Path.parse(spec, api) for spec in [args.url, *args.via]]
        settings = ProbeSettings(
            api=api,
            model=args.model,
            prompt=args.prompt,
            max_tokens=args.max_tokens,
            requests=args.requests,
            warmup=max(0, args.warmup),
            timeout_s=args.timeout,
            headers=tuple(args.headers),
        )
        report = asyncio.run(probe(paths, settings))
    except ProbeError as exc:
        return _fail(str(exc))
    if args.json:
        sys.stdout.buffer.write(orjson.dumps(report, option=orjson.OPT_INDENT_2) + b"\n")
    else:
        sys.stdout.write(render(report))
    if args.chart is not None:
        from flushgate.doctor.chart import ChartUnavailable, write_chart

        try:
            write_chart(report, args.chart)
        except ChartUnavailable as exc:
            return _fail(str(exc))
    return 0


def _lines(source: str) -> Iterator[bytes]:
    if source == "-":
        yield from sys.stdin.buffer
        return
    with open(source, "rb") as handle:
        yield from handle


def _run_logs(args: argparse.Namespace) -> int:
    try:
        report = analyse_lines(_lines(args.file), worst=max(0, args.worst), worst_by=args.worst_by)
    except OSError as exc:
        return _fail(f"cannot read {args.file}: {exc.strerror or exc}")
    if args.json:
        sys.stdout.buffer.write(orjson.dumps(report, option=orjson.OPT_INDENT_2) + b"\n")
    else:
        sys.stdout.write(render_logs(report))
    return 0 if report.records else 1
