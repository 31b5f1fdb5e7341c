"""Engines found in DNS, e.g. the pods behind a Kubernetes headless Service, looked up again on a fixed beat.

A headless Service (``clusterIP: None``) publishes one A record per ready pod, and an SRV record per pod for each
named port (``_http._tcp.NAME``); scaling the Deployment changes those records, and the next lookup changes the
pool, so engines are added and removed without restarting the gateway. A lookup that fails (timeout, server
failure) keeps the engines already known; a name that has no records (NXDOMAIN: no ready pod) empties the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import dns.asyncresolver
import dns.exception
import dns.resolver
from aiohttp.abc import AbstractResolver

from flushgate.proxy.pool import EnginePool
from flushgate.proxy.upstream import Backend

SrvLookup = Callable[[str], Awaitable[list[tuple[str, int]]]]
_NO_SUCH_NAME = {socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)}


class NoRecords(Exception):
    """The name exists in no record of the asked type: no engine is published under it now."""


@dataclass(frozen=True, slots=True)
class DnsTarget:
    """``NAME:PORT`` (A/AAAA records, one port for all) or ``_SERVICE._PROTO.NAME`` (SRV records, ports included)."""

    name: str
    port: int | None
    scheme: str = "http"

    @classmethod
    def parse(cls, spec: str) -> DnsTarget:
        scheme = "http"
        for prefix in ("http://", "https://"):
            if spec.startswith(prefix):
                scheme, spec = prefix[:-3], spec[len(prefix) :]
        spec = spec.rstrip("/")
        if spec.startswith("_"):
            if ":" in spec:
                raise ValueError(f"an SRV name carries its own ports; drop ':PORT' from {spec!r}")
            return cls(spec, None, scheme)
        name, sep, port = spec.rpartition(":")
        if not sep or not name or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"expected NAME:PORT or an SRV name _SERVICE._PROTO.NAME, got {spec!r}")
        return cls(name, int(port), scheme)

    def __str__(self) -> str:
        return self.name if self.port is None else f"{self.name}:{self.port}"

    def url(self, host: str, port: int) -> str:
        return f"{self.scheme}://[{host}]:{port}" if ":" in host else f"{self.scheme}://{host}:{port}"


async def dnspython_srv(name: str, resolver: dns.asyncresolver.Resolver | None = None) -> list[tuple[str, int]]:
    """SRV records as (target host, port), through dnspython (the system resolver cannot ask for SRV).

    A short name is tried with the search domains of resolv.conf, as getaddrinfo does, so inside a pod
    ``_http._tcp.vllm`` finds ``_http._tcp.vllm.<namespace>.svc.cluster.local``."""
    try:
        answer = await (resolver or dns.asyncresolver.get_default_resolver()).resolve(name, "SRV", search=True)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer) as exc:
        raise NoRecords(str(exc)) from exc
    return [(record.target.to_text(omit_final_dot=True), int(record.port)) for record in answer]


class DnsDiscovery:
    def __init__(
        self,
        target: DnsTarget,
        pool: EnginePool,
        *,
        make_backend: Callable[[str], Backend],
        resolver: AbstractResolver,
        interval_s: float,
        log: Any,
        srv_lookup: SrvLookup = dnspython_srv,
    ) -> None:
        self.target = target
        self.pool = pool
        self.make_backend = make_backend
        self.resolver = resolver
        self.srv_lookup = srv_lookup
        self.interval_s = interval_s
        self.log = log
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="engine-discovery")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.refresh()

    async def refresh(self) -> None:
        """One lookup; the pool follows its answer (or stays as it was if the lookup failed)."""
        reason: str | None = None
        try:
            urls = sorted(set(await self._lookup()))
        except NoRecords as exc:
            urls = []
            reason = str(exc)
        except (OSError, dns.exception.DNSException) as exc:
            self.log.warning("discovery_failed", name=str(self.target), error=str(exc) or type(exc).__name__)
            return
        current = {m.url: m.backend for m in self.pool.members}
        added, removed = self.pool.replace(current.get(url) or self.make_backend(url) for url in urls)
        if added or removed:
            self.log.info(
                "engines_discovered", name=str(self.target), added=added, removed=removed, engines=urls, note=reason
            )

    async def _lookup(self) -> list[str]:
        if self.target.port is not None:
            return [self.target.url(host, self.target.port) for host in await self._addresses(self.target.name)]
        urls: list[str] = []
        for host, port in await self.srv_lookup(self.target.name):
            with contextlib.suppress(NoRecords):  # a pod that went away between the two lookups
                urls.extend(self.target.url(address, port) for address in await self._addresses(host))
        return urls

    async def _addresses(self, host: str) -> list[str]:
        try:
            found = await self.resolver.resolve(host, 0, family=socket.AF_UNSPEC)
        except socket.gaierror as exc:
            if exc.errno in _NO_SUCH_NAME:
                raise NoRecords(f"{host}: {exc.strerror}") from exc
            raise
        return [entry["host"] for entry in found]
