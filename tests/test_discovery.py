"""Engines found in DNS (a Kubernetes headless Service): the pool follows the records without a restart.

A records come from a resolver the test controls through aiohttp's resolver interface; SRV records come from a
small DNS server on loopback, asked through dnspython exactly as in production.
"""

from __future__ import annotations

import asyncio
import functools
import socket
from collections.abc import AsyncIterator
from typing import cast

import aiohttp
import dns.asyncresolver
import dns.message
import dns.rcode
import dns.rrset
import pytest
from aiohttp import web

from flushgate.config import Config, Routing
from flushgate.proxy.discovery import DnsTarget, dnspython_srv
from flushgate.server import Server
from tests.fakes import FakeUpstream, start_stream
from tests.several_engines import GUARD_S, EngineFarm, ScriptedResolver, answer_event

NAME = "engines.flushgate.test"


class SrvServer(asyncio.DatagramProtocol):
    """A DNS server for SRV questions only, on a loopback UDP port."""

    def __init__(self) -> None:
        self.records: dict[str, list[tuple[str, int]]] = {}
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)  # 3.11's selector transport lacks the base

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        query = dns.message.from_wire(data)
        response = dns.message.make_response(query)
        question = query.question[0]
        found = self.records.get(question.name.to_text(omit_final_dot=True))
        if found:
            texts = [f"0 0 {port} {target}." for target, port in found]
            response.answer.append(dns.rrset.from_text(question.name, 5, "IN", "SRV", *texts))
        else:
            response.set_rcode(dns.rcode.NXDOMAIN)
        assert self.transport is not None
        self.transport.sendto(response.to_wire(), addr)


@pytest.fixture
def resolver() -> ScriptedResolver:
    return ScriptedResolver()


@pytest.fixture
async def same_port_farm() -> AsyncIterator[EngineFarm]:
    """Two engines on one port at two loopback addresses, as pods behind a headless Service are."""
    first = FakeUpstream(host="127.0.0.2")
    await first.start()
    second = FakeUpstream(host="127.0.0.3", port=first.port)
    await second.start()
    farm = EngineFarm([first, second])
    yield farm
    for fake in farm.fakes:
        await fake.stop()


async def start_discovering(target: str, resolver: ScriptedResolver, **kwargs: object) -> Server:
    routing = Routing(health_interval=0, dns_interval=3600)  # the test refreshes when it changes the records
    server = Server(Config(upstream_dns=target, port=0, routing=routing), resolver=resolver, **kwargs)  # type: ignore[arg-type]
    await server.start()
    return server


async def refresh(server: Server) -> None:
    assert server.discovery is not None
    await server.discovery.refresh()


async def served_by(http: aiohttp.ClientSession, server: Server, farm: EngineFarm, requests: int) -> list[int]:
    before = len(farm.arrivals)
    for _ in range(requests):
        async with http.post(f"http://127.0.0.1:{server.port}/v1/chat/completions", data=b"{}") as resp:
            assert resp.status == 200
            await resp.read()
    return sorted(engine for engine, _ in farm.arrivals[before:])


def test_dns_targets_parse_as_address_or_srv_names() -> None:
    assert DnsTarget.parse("vllm.default.svc.cluster.local:8000") == DnsTarget("vllm.default.svc.cluster.local", 8000)
    assert DnsTarget.parse("_http._tcp.vllm") == DnsTarget("_http._tcp.vllm", None)
    assert DnsTarget.parse("https://vllm:8443").url("10.1.2.3", 8443) == "https://10.1.2.3:8443"
    assert DnsTarget("vllm", 8000).url("fd00::5", 8000) == "http://[fd00::5]:8000"
    for bad in ("vllm", "vllm:0", "vllm:http", "_http._tcp.vllm:80"):
        with pytest.raises(ValueError, match=r"NAME:PORT|SRV"):
            DnsTarget.parse(bad)


async def test_scaling_the_service_up_and_down_changes_the_engines_without_a_restart(
    same_port_farm: EngineFarm, resolver: ScriptedResolver, http: aiohttp.ClientSession
) -> None:
    farm = same_port_farm
    port = farm.fakes[0].port
    resolver.records[NAME] = ["127.0.0.2"]
    server = await start_discovering(f"{NAME}:{port}", resolver)
    try:
        assert await served_by(http, server, farm, 2) == [0, 0]
        resolver.records[NAME] = ["127.0.0.2", "127.0.0.3"]
        await refresh(server)
        assert await served_by(http, server, farm, 4) == [0, 0, 1, 1]
        resolver.records[NAME] = ["127.0.0.3"]
        await refresh(server)
        assert await served_by(http, server, farm, 2) == [1, 1]
    finally:
        await server.stop()


async def test_a_stream_on_an_engine_that_left_the_service_finishes(
    same_port_farm: EngineFarm, resolver: ScriptedResolver, http: aiohttp.ClientSession
) -> None:
    farm = same_port_farm
    release = asyncio.Event()

    async def held(request: web.Request, engine: int) -> web.StreamResponse:
        response = await start_stream(request)
        await response.write(answer_event(engine))
        await release.wait()
        await response.write(b"data: [DONE]\n\n")
        return response

    farm.script = [held]
    resolver.records[NAME] = ["127.0.0.2"]
    server = await start_discovering(f"{NAME}:{farm.fakes[0].port}", resolver)
    try:
        resp = await http.post(f"http://127.0.0.1:{server.port}/v1/chat/completions", data=b"{}")
        assert await asyncio.wait_for(resp.content.readuntil(b"\n\n"), GUARD_S) == answer_event(0)
        resolver.records[NAME] = ["127.0.0.3"]
        await refresh(server)
        release.set()
        assert await asyncio.wait_for(resp.read(), GUARD_S) == b"data: [DONE]\n\n"
        resp.release()
        assert await served_by(http, server, farm, 1) == [1]
    finally:
        await server.stop()


async def test_a_failed_lookup_keeps_the_engines_and_no_records_empties_the_pool(
    same_port_farm: EngineFarm, resolver: ScriptedResolver, http: aiohttp.ClientSession
) -> None:
    farm = same_port_farm
    resolver.records[NAME] = ["127.0.0.2"]
    server = await start_discovering(f"{NAME}:{farm.fakes[0].port}", resolver)
    base = f"http://127.0.0.1:{server.port}"
    try:
        resolver.failure = socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        await refresh(server)
        assert await served_by(http, server, farm, 1) == [0]
        resolver.failure = None
        del resolver.records[NAME]  # no ready pod: the name has no records
        await refresh(server)
        async with http.post(base + "/v1/chat/completions", data=b"{}") as resp:
            assert resp.status == 503
            assert resp.headers["Retry-After"] == "5"
            error = (await resp.json())["error"]
        assert error["code"] == "no_engine"
        assert NAME in error["message"]
        async with http.get(base + "/readyz") as ready:
            assert ready.status == 503
    finally:
        await server.stop()


async def test_a_gateway_started_before_any_engine_exists_finds_them_later(
    same_port_farm: EngineFarm, resolver: ScriptedResolver, http: aiohttp.ClientSession
) -> None:
    farm = same_port_farm
    server = await start_discovering(f"{NAME}:{farm.fakes[0].port}", resolver)
    base = f"http://127.0.0.1:{server.port}"
    try:
        async with http.get(base + "/readyz") as ready:
            assert ready.status == 503
        resolver.records[NAME] = ["127.0.0.2", "127.0.0.3"]
        await refresh(server)
        async with http.get(base + "/readyz") as ready:
            assert ready.status == 200
            assert [e["url"] for e in (await ready.json())["engines"]] == farm.urls
    finally:
        await server.stop()


async def test_srv_records_bring_engines_on_their_own_ports(
    resolver: ScriptedResolver, http: aiohttp.ClientSession
) -> None:
    loop = asyncio.get_running_loop()
    dns_server = SrvServer()
    transport, _ = await loop.create_datagram_endpoint(lambda: dns_server, local_addr=("127.0.0.1", 0))
    asker = dns.asyncresolver.Resolver(configure=False)
    asker.nameservers = ["127.0.0.1"]
    asker.port = transport.get_extra_info("sockname")[1]
    fakes = [FakeUpstream(), FakeUpstream()]
    for fake in fakes:
        await fake.start()
    farm = EngineFarm(fakes)
    srv_name = "_http._tcp." + NAME
    dns_server.records[srv_name] = [("pod-a." + NAME, fakes[0].port)]
    resolver.records["pod-a." + NAME] = ["127.0.0.1"]
    resolver.records["pod-b." + NAME] = ["127.0.0.1"]
    server = await start_discovering(srv_name, resolver, srv_lookup=functools.partial(dnspython_srv, resolver=asker))
    try:
        assert await served_by(http, server, farm, 2) == [0, 0]
        dns_server.records[srv_name].append(("pod-b." + NAME, fakes[1].port))
        await refresh(server)
        assert await served_by(http, server, farm, 2) == [0, 1]
        del dns_server.records[srv_name]
        await refresh(server)
        async with http.post(f"http://127.0.0.1:{server.port}/v1/chat/completions", data=b"{}") as resp:
            assert resp.status == 503
    finally:
        await server.stop()
        for fake in fakes:
            await fake.stop()
        transport.close()
