"""``/metrics`` of a ``--workers`` group: every worker's series, each labelled ``worker``, from whichever worker
the scrape reaches.

The kernel hands each new connection to one worker, so a scrape of the shared port alone would read one worker's
numbers, another one's at the next scrape: counters that seem to jump back and forth. Each worker also serves its
own registry on a Unix socket in a folder only the group uses, and the worker a scrape reaches reads its siblings'
there and answers for all of them, as one exposition. Summing over ``worker`` gives the gateway's figures
(prometheus-adapter's default query sums every series of a pod).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

SIBLING_TIMEOUT_S = 1.0  # a worker that does not answer by then (restarting, stuck) is left out of this scrape
SOCKET_SUFFIX = ".sock"


class _Families(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


def merge(expositions: dict[int, str]) -> bytes:
    """One exposition from several workers' own: every sample gains the label ``worker``; families of the same
    name are written once, with the samples of every worker."""
    merged: dict[str, Metric] = {}
    for worker, text in sorted(expositions.items()):
        label = str(worker)
        for family in text_string_to_metric_families(text):
            into = merged.setdefault(family.name, family)
            samples = [
                Sample(s.name, {**s.labels, "worker": label}, s.value, s.timestamp, s.exemplar) for s in family.samples
            ]
            if into is family:
                family.samples = samples
            else:
                into.samples.extend(samples)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(list(merged.values())))
    return generate_latest(registry)


class WorkerMetrics:
    """This worker's socket in the group's folder, and the scrape of every worker's."""

    def __init__(self, folder: Path, index: int, render_own: Callable[[], bytes]) -> None:
        self.folder = folder
        self.index = index
        self.render_own = render_own
        self._runner: web.AppRunner | None = None
        self._group = os.getppid()  # the group's first process, which made the folder and removes it

    @property
    def path(self) -> Path:
        return self.folder / f"{self.index}{SOCKET_SUFFIX}"

    async def start(self) -> None:
        async def own(request: web.Request) -> web.Response:
            return web.Response(body=self.render_own(), content_type="text/plain")

        app = web.Application()
        app.router.add_get("/metrics", own)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # left by this worker's previous process, if it died
        await web.UnixSite(self._runner, str(self.path)).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        if os.getppid() != self._group:  # it died (SIGKILL) and cannot: the last worker out removes the folder
            with contextlib.suppress(OSError):  # not empty while a sibling's socket is still there
                self.folder.rmdir()

    async def _sibling(self, path: Path) -> tuple[int, str] | None:
        try:
            index = int(path.name.removesuffix(SOCKET_SUFFIX))
            timeout = aiohttp.ClientTimeout(total=SIBLING_TIMEOUT_S)
            async with (
                aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(path)), timeout=timeout) as http,
                http.get("http://worker/metrics") as resp,
            ):
                resp.raise_for_status()
                return index, await resp.text()
        except (TimeoutError, ValueError, OSError, aiohttp.ClientError):
            return None  # not a worker's socket, or one that is gone or restarting: left out of this scrape

    async def render_all(self) -> bytes:
        siblings = [p for p in self.folder.glob(f"*{SOCKET_SUFFIX}") if p != self.path]
        found = await asyncio.gather(*(self._sibling(path) for path in siblings))
        texts = dict(item for item in found if item is not None)
        texts[self.index] = self.render_own().decode()
        return merge(texts)
