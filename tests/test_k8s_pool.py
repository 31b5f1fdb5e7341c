"""The pool overlay (a gateway tier over engine pods behind a headless Service): valid manifests, consistent
with what flushgate does with them."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import kubernetes_validate  # type: ignore[import-untyped]
import pytest

from flushgate.cli import build_parser, config_from_args
from flushgate.config import Config
from flushgate.engine.command import build_spec
from flushgate.engine.presets import PRESETS
from flushgate.proxy.discovery import DnsTarget
from flushgate.server import Server
from tests.k8s_manifests import Manifest, container, flag, overlay, overlay_with_components, port_number, split_flags
from tests.several_engines import EngineFarm, ScriptedResolver, start_farm, stop_farm

KUBERNETES_VERSIONS = ("1.30.0", kubernetes_validate.latest_version() + ".0")
ENGINES = "flushgate-engines"
COREDNS_TTL_S = 5  # the kubernetes plugin's default TTL for Service records
ENGINE_STOP_S = 15


def named(docs: list[Manifest], kind: str, name: str) -> Manifest:
    (found,) = [doc for doc in docs if doc["kind"] == kind and doc["metadata"]["name"] == name]
    return found


def pod(docs: list[Manifest], deployment: str) -> Manifest:
    spec: Manifest = named(docs, "Deployment", deployment)["spec"]["template"]["spec"]
    return spec


def gateway_args(docs: list[Manifest]) -> list[str]:
    args: list[str] = container(pod(docs, "flushgate"), "flushgate")["args"]
    return args


def gateway_config(docs: list[Manifest]) -> Config:
    return config_from_args(build_parser().parse_args(["serve", *gateway_args(docs)]))


@pytest.fixture(scope="module")
def docs() -> list[Manifest]:
    return overlay("pool")


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_the_pool_overlay_renders_to_manifests_that_match_the_kubernetes_schemas(
    docs: list[Manifest], version: str
) -> None:
    kinds = sorted((doc["kind"], doc["metadata"]["name"]) for doc in docs)
    assert kinds == [
        ("Deployment", "flushgate"),
        ("Deployment", ENGINES),
        ("NetworkPolicy", ENGINES),
        ("PodDisruptionBudget", "flushgate"),
        ("PodDisruptionBudget", ENGINES),
        ("Service", "flushgate"),
        ("Service", ENGINES),
    ]
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


def test_with_both_autoscalers_each_tier_scales_on_its_own_in_flight_streams(tmp_path: Path) -> None:
    docs = overlay_with_components("pool", ("hpa-inflight", "hpa-engines"), tmp_path)
    for doc in docs:
        for version in KUBERNETES_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)
    scaled = {
        doc["spec"]["scaleTargetRef"]["name"]: doc["spec"]["metrics"][0]["pods"]["metric"]["name"]
        for doc in docs
        if doc["kind"] == "HorizontalPodAutoscaler"
    }
    assert scaled == {"flushgate": "flushgate_inflight_requests", ENGINES: "vllm_requests_in_flight"}
    assert all("replicas" not in doc["spec"] for doc in docs if doc["kind"] == "Deployment")


def test_the_gateway_looks_up_the_headless_service_on_the_engines_port(docs: list[Manifest]) -> None:
    config = gateway_config(docs)
    assert config.upstream_dns is not None
    assert config.routing.mode == "prefix-affinity"
    target = DnsTarget.parse(config.upstream_dns)
    service = named(docs, "Service", ENGINES)
    assert service["spec"]["clusterIP"] == "None"
    assert target.name == service["metadata"]["name"]
    (port,) = service["spec"]["ports"]
    engine = container(pod(docs, ENGINES), "vllm")
    assert target.port == port["port"] == port_number(engine, port["targetPort"])
    assert port["name"] == "http"  # so the SRV name _http._tcp.flushgate-engines exists too
    labels = named(docs, "Deployment", ENGINES)["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    gateway_labels = named(docs, "Deployment", "flushgate")["spec"]["template"]["metadata"]["labels"]
    assert not service["spec"]["selector"].items() <= gateway_labels.items()


def test_engine_pods_run_vllm_as_a_managed_engine_would_but_on_the_pods_address(docs: list[Manifest]) -> None:
    args = container(pod(docs, ENGINES), "vllm")["args"]
    assert flag(args, "--host") == "0.0.0.0"
    model = flag(args, "--model")
    assert model is not None
    managed = build_spec(model, python="python3", preset=PRESETS["qwen3-14b-fp8"], port=8000)
    expected = [*managed.argv[3:]]
    expected[expected.index("--host") + 1] = "0.0.0.0"
    assert split_flags(args) == expected


def test_only_engine_pods_get_a_gpu_and_the_engine_volumes(docs: list[Manifest]) -> None:
    gateway, engine = pod(docs, "flushgate"), pod(docs, ENGINES)
    assert "nvidia.com/gpu" not in container(gateway, "flushgate")["resources"].get("limits", {})
    assert [volume["name"] for volume in gateway["volumes"]] == ["tmp"]
    assert container(engine, "vllm")["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {volume["name"] for volume in engine["volumes"]} == {"tmp", "dshm", "model-cache"}


def test_a_terminating_engine_stays_up_until_the_gateways_have_stopped_sending_to_it(docs: list[Manifest]) -> None:
    config = gateway_config(docs)
    engine_pod = pod(docs, ENGINES)
    pre_stop = container(engine_pod, "vllm")["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pre_stop >= config.routing.dns_interval + COREDNS_TTL_S + config.timeouts.drain
    assert engine_pod["terminationGracePeriodSeconds"] >= pre_stop + ENGINE_STOP_S


def test_only_gateways_and_prometheus_may_reach_the_engines(docs: list[Manifest]) -> None:
    policy = named(docs, "NetworkPolicy", ENGINES)["spec"]
    assert policy["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": ENGINES}
    (rule,) = policy["ingress"]
    peers = [peer["podSelector"]["matchLabels"]["app.kubernetes.io/name"] for peer in rule["from"]]
    assert peers == ["flushgate", "prometheus"]
    assert rule["ports"] == [{"port": "http", "protocol": "TCP"}]


async def test_a_gateway_with_the_overlays_flags_finds_the_engines_by_the_service_name(
    docs: list[Manifest], http: aiohttp.ClientSession
) -> None:
    farm: EngineFarm = await start_farm(2)
    target = DnsTarget.parse(gateway_config(docs).upstream_dns or "")
    resolver = ScriptedResolver()
    resolver.records[target.name] = ["127.0.0.1"]
    args = [
        f"--upstream-dns={target.name}:{farm.fakes[0].port}" if arg.startswith("--upstream-dns") else arg
        for arg in gateway_args(docs)
        if not arg.startswith(("--host", "--port"))
    ]
    config = config_from_args(build_parser().parse_args(["serve", *args, "--host", "127.0.0.1", "--port", "0"]))
    server = Server(config, resolver=resolver)
    await server.start()
    try:
        async with http.get(f"http://127.0.0.1:{server.port}/readyz") as ready:
            assert ready.status == 200
            assert [engine["url"] for engine in (await ready.json())["engines"]] == [farm.urls[0]]
        async with http.post(f"http://127.0.0.1:{server.port}/v1/chat/completions", data=b"{}") as resp:
            assert resp.status == 200
            await resp.read()
        assert farm.served_by(0) == 1
    finally:
        await server.stop()
        await stop_farm(farm)


def test_the_engine_pods_keep_idle_connections_longer_than_the_gateway_does() -> None:
    docs = overlay("pool")
    gateway = config_from_args(build_parser().parse_args(["serve", *gateway_args(docs)])).timeouts.engine_keepalive
    env = {each["name"]: each.get("value") for each in container(pod(docs, ENGINES), "vllm")["env"]}
    assert float(env["VLLM_HTTP_TIMEOUT_KEEP_ALIVE"]) >= gateway + 1
    assert gateway > 5  # longer than vLLM's default, or the setting would not be needed
