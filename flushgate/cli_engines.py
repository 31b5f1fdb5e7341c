"""Flags for several engines: how they are found or started, and how requests are spread over them."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from flushgate.config import ROUTING_MODES, Routing

T = TypeVar("T")
Env = Callable[[str, T, Callable[[str], T]], T]


class RepeatableFlag(argparse.Action):
    """A flag that may be given several times; its first use on the command line replaces the environment's."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        marker = f"_{self.dest}_given"
        collected = list(getattr(namespace, self.dest) or []) if getattr(namespace, marker, False) else []
        collected.append(values)
        setattr(namespace, self.dest, collected)
        setattr(namespace, marker, True)


def url_list(raw: str) -> list[str]:
    """``FLUSHGATE_UPSTREAM``: one URL, or several separated by commas or spaces."""
    return [url for url in re.split(r"[,\s]+", raw) if url]


def id_list(raw: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in raw.split(",") if item.strip())


def add_managed_engine_flags(group: argparse._ArgumentGroup, env: Env[Any]) -> None:
    group.add_argument(
        "--engines",
        type=int,
        default=env("ENGINES", 1, int),
        metavar="N",
        help="number of managed engines; spread over the GPUs in turn, sharing a GPU's memory where there are more "
        "engines than GPUs (FLUSHGATE_ENGINES)",
    )
    group.add_argument(
        "--gpus",
        type=id_list,
        default=env("GPUS", None, id_list),
        metavar="IDS",
        help="GPUs to spread managed engines over, e.g. 0,1,2,3; default: CUDA_VISIBLE_DEVICES, else every GPU "
        "the NVIDIA driver lists, else none (FLUSHGATE_GPUS)",
    )


def add_routing_flags(parser: argparse.ArgumentParser, env: Env[Any]) -> None:
    defaults = Routing()
    group = parser.add_argument_group("several engines")
    group.add_argument(
        "--upstream-dns",
        default=env("UPSTREAM_DNS", None, str),
        metavar="NAME:PORT",
        help="find engines in DNS and look again every --dns-interval: NAME:PORT for A/AAAA records (a Kubernetes "
        "headless Service), or an SRV name such as _http._tcp.vllm.default.svc.cluster.local (FLUSHGATE_UPSTREAM_DNS)",
    )
    group.add_argument(
        "--dns-interval",
        type=float,
        default=env("DNS_INTERVAL", defaults.dns_interval, float),
        metavar="S",
        help="seconds between DNS lookups of --upstream-dns (FLUSHGATE_DNS_INTERVAL)",
    )
    group.add_argument(
        "--routing",
        choices=ROUTING_MODES,
        default=env("ROUTING", defaults.mode, str),
        help="least-outstanding: the engine with the fewest open requests; prefix-affinity: the engine chosen by "
        "the conversation's leading messages, so vLLM's prefix cache hits, unless it is much busier than the rest "
        "(FLUSHGATE_ROUTING)",
    )
    group.add_argument(
        "--affinity-load-factor",
        type=float,
        default=env("AFFINITY_LOAD_FACTOR", defaults.affinity_load_factor, float),
        metavar="F",
        help="prefix-affinity: go to the least busy engine instead when the preferred one would hold more than F "
        "times the average open requests (FLUSHGATE_AFFINITY_LOAD_FACTOR)",
    )
    group.add_argument(
        "--retries",
        type=int,
        default=env("RETRIES", defaults.retries, int),
        metavar="N",
        help="other engines a request is tried on when one fails before anything was sent to the client "
        "(FLUSHGATE_RETRIES)",
    )
    group.add_argument(
        "--health-interval",
        type=float,
        default=env("HEALTH_INTERVAL", defaults.health_interval, float),
        metavar="S",
        help="seconds between checks of every engine's readiness (/health); 0 turns them off "
        "(FLUSHGATE_HEALTH_INTERVAL)",
    )
    group.add_argument(
        "--eject-after",
        type=int,
        default=env("EJECT_AFTER", defaults.eject_after, int),
        metavar="N",
        help="take an engine out of rotation after N 5xx answers or broken streams in a row; a refused connection "
        "takes it out at once (FLUSHGATE_EJECT_AFTER)",
    )
    group.add_argument(
        "--eject-time",
        type=float,
        default=env("EJECT_TIME", defaults.eject_time, float),
        metavar="S",
        help="seconds an ejected engine stays out of rotation (FLUSHGATE_EJECT_TIME)",
    )


def upstream_from_args(args: argparse.Namespace) -> str | tuple[str, ...] | None:
    urls: list[str] | None = args.upstream
    if not urls:
        return None
    return urls[0] if len(urls) == 1 else tuple(urls)


def routing_from_args(args: argparse.Namespace) -> Routing:
    return Routing(
        mode=args.routing,
        affinity_load_factor=args.affinity_load_factor,
        retries=args.retries,
        health_interval=args.health_interval,
        eject_after=args.eject_after,
        eject_time=args.eject_time,
        dns_interval=args.dns_interval,
    )
