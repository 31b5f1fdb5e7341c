"""The Kubernetes manifests: valid for the cluster, and consistent with what flushgate and vLLM actually do.

Each overlay is rendered with the real ``kubectl kustomize`` and checked offline against the Kubernetes
OpenAPI schemas bundled in ``kubernetes-validate`` (strict: unknown fields are errors), for the oldest
Kubernetes the manifests support and the newest the validator knows.
"""

from __future__ import annotations

import copy
from pathlib import Path
from urllib.parse import urlsplit

import kubernetes_validate  # type: ignore[import-untyped]
import pytest

from flushgate.cli import build_parser, config_from_args
from flushgate.engine.command import build_spec
from flushgate.engine.presets import PRESETS
from tests.k8s_manifests import (
    COMPONENTS,
    GATEWAY_CLOSE_S,
    OVERLAYS,
    PROBES,
    Manifest,
    all_containers,
    container,
    engine_container,
    flag,
    one,
    overlay,
    overlay_with_components,
    pod_spec,
    port_number,
    service_link_env,
    split_flags,
    volume_of,
)

# Native sidecar containers and the preStop sleep action are on by default from 1.29 and 1.30 on.
KUBERNETES_VERSIONS = ("1.30.0", kubernetes_validate.latest_version() + ".0")
# After SIGKILL, flushgate waits up to this long for the engine's process group to be gone (engine/process.py).
ENGINE_KILL_WAIT_S = 5.0
# The sidecar's vLLM is stopped by the kubelet after flushgate has exited; the time reserved for it.
SIDECAR_ENGINE_STOP_S = 15.0
MARGIN_S = 5.0


def serve_args(docs: list[Manifest]) -> list[str]:
    args: list[str] = container(pod_spec(docs), "flushgate")["args"]
    return args


def check_schemas(docs: list[Manifest], version: str) -> list[str]:
    """Validates every manifest; returns the kinds no Kubernetes schema covers (custom resources)."""
    unchecked = []
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            unchecked.append(doc["kind"])
    return unchecked


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("name", OVERLAYS)
def test_each_overlay_renders_to_manifests_that_match_the_kubernetes_schemas(name: str, version: str) -> None:
    docs = overlay(name)
    assert sorted(doc["kind"] for doc in docs) == ["Deployment", "PodDisruptionBudget", "Service"]
    assert check_schemas(docs, version) == []


@pytest.mark.parametrize("name", OVERLAYS)
def test_each_overlay_with_every_component_matches_the_schemas_but_for_the_servicemonitor_crd(
    name: str, tmp_path: Path
) -> None:
    docs = overlay_with_components(name, COMPONENTS, tmp_path)
    kinds = sorted(doc["kind"] for doc in docs)
    assert kinds == [
        "Deployment",
        "HorizontalPodAutoscaler",
        "PersistentVolumeClaim",
        "PodDisruptionBudget",
        "Service",
        "ServiceMonitor",
    ]
    for version in KUBERNETES_VERSIONS:
        assert check_schemas(docs, version) == ["ServiceMonitor"]  # a CRD: checked for consistency below instead


def test_the_schema_check_rejects_a_misspelt_field() -> None:
    docs = overlay("sidecar")
    flushgate = container(pod_spec(docs), "flushgate")
    flushgate["readinesProbe"] = flushgate.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        check_schemas(docs, KUBERNETES_VERSIONS[0])


@pytest.mark.parametrize("name", OVERLAYS)
def test_the_flushgate_flags_in_each_overlay_are_accepted_by_the_real_cli(name: str) -> None:
    args = build_parser().parse_args(["serve", *serve_args(overlay(name))])
    config = config_from_args(args)  # raises on any combination flushgate refuses
    assert config.host == "0.0.0.0"
    if name == "sidecar":
        assert config.upstream is not None
        assert config.model is None
    else:
        assert config.model is not None
        assert config.preset in PRESETS


@pytest.mark.parametrize("name", OVERLAYS)
def test_probes_ask_the_gateways_own_paths_on_the_port_it_listens_on(name: str) -> None:
    docs = overlay(name)
    flushgate = container(pod_spec(docs), "flushgate")
    probes = {kind: flushgate[kind]["httpGet"] for kind in PROBES}
    assert {kind: probe["path"] for kind, probe in probes.items()} == {
        "startupProbe": "/readyz",
        "readinessProbe": "/readyz",
        "livenessProbe": "/healthz",
    }
    listening = int(flag(serve_args(docs), "--port") or 0)
    assert {port_number(flushgate, probe["port"]) for probe in probes.values()} == {listening}


@pytest.mark.parametrize("name", OVERLAYS)
def test_the_service_exposes_the_gateway_port_and_no_other(name: str) -> None:
    docs = overlay(name)
    pod = pod_spec(docs)
    flushgate = container(pod, "flushgate")
    service = one(docs, "Service")
    targets = [port_number(flushgate, port["targetPort"]) for port in service["spec"]["ports"]]
    assert targets == [int(flag(serve_args(docs), "--port") or 0)]
    others = [each["name"] for each in all_containers(pod) if each is not flushgate and each.get("ports")]
    assert others == []
    template_labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= template_labels.items()


def test_the_sidecar_vllm_listens_on_loopback_at_the_port_flushgate_attaches_to() -> None:
    docs = overlay("sidecar")
    vllm_args = container(pod_spec(docs), "vllm")["args"]
    upstream = urlsplit(flag(serve_args(docs), "--upstream") or "")
    assert flag(vllm_args, "--host") == "127.0.0.1"
    assert upstream.hostname == "127.0.0.1"
    assert upstream.port == int(flag(vllm_args, "--port") or 0)


def test_the_sidecar_vllm_is_started_as_the_managed_engine_would_be() -> None:
    """Same model, same preset: one set-up in both overlays (the managed engine adds only its private trace export)."""
    sidecar = container(pod_spec(overlay("sidecar")), "vllm")
    managed = serve_args(overlay("managed"))
    model = flag(managed, "--model") or ""
    preset = PRESETS[flag(managed, "--preset") or ""]
    spec = build_spec(model, python="python3", preset=preset, port=int(flag(sidecar["args"], "--port") or 0))
    assert [*sidecar["command"], *split_flags(sidecar["args"])] == list(spec.argv)
    assert flag(sidecar["args"], "--model") == model


def test_the_sidecar_vllm_keeps_idle_connections_longer_than_flushgate_does() -> None:
    docs = overlay("sidecar")
    gateway = config_from_args(build_parser().parse_args(["serve", *serve_args(docs)])).timeouts.engine_keepalive
    env = {each["name"]: each.get("value") for each in container(pod_spec(docs), "vllm")["env"]}
    assert float(env["VLLM_HTTP_TIMEOUT_KEEP_ALIVE"]) >= gateway + 1
    assert gateway > 5  # longer than vLLM's default, or the setting would not be needed
    managed = config_from_args(build_parser().parse_args(["serve", *serve_args(overlay("managed"))]))
    assert managed.timeouts.engine_keepalive == gateway  # the managed engine is told the same by flushgate


def test_the_sidecar_vllm_starts_before_flushgate_and_stops_after_it() -> None:
    """A native sidecar: started first, and on termination stopped only once flushgate has drained and exited."""
    pod = pod_spec(overlay("sidecar"))
    assert [each["name"] for each in pod["initContainers"]] == ["vllm"]
    assert pod["initContainers"][0]["restartPolicy"] == "Always"
    assert [each["name"] for each in pod["containers"]] == ["flushgate"]
    assert "startupProbe" not in pod["initContainers"][0]  # one would hold flushgate back until the model loaded


@pytest.mark.parametrize("name", OVERLAYS)
def test_the_grace_period_covers_prestop_drain_and_engine_stop(name: str) -> None:
    docs = overlay(name)
    pod = pod_spec(docs)
    args = build_parser().parse_args(["serve", *serve_args(docs)])
    pre_stop = container(pod, "flushgate")["lifecycle"]["preStop"]["sleep"]["seconds"]
    gateway_done = pre_stop + args.drain_timeout + GATEWAY_CLOSE_S
    if name == "managed":
        needed = gateway_done + args.engine_grace + ENGINE_KILL_WAIT_S
    else:
        needed = gateway_done + SIDECAR_ENGINE_STOP_S
    assert pod["terminationGracePeriodSeconds"] >= needed + MARGIN_S


@pytest.mark.parametrize("name", OVERLAYS)
def test_a_rollout_waits_longer_than_the_startup_budget_for_the_model_to_load(name: str) -> None:
    docs = overlay(name)
    startup = container(pod_spec(docs), "flushgate")["startupProbe"]
    budget = startup.get("initialDelaySeconds", 0) + startup["periodSeconds"] * startup["failureThreshold"]
    assert budget >= 600
    assert one(docs, "Deployment")["spec"]["progressDeadlineSeconds"] > budget


@pytest.mark.parametrize("name", OVERLAYS)
def test_every_container_runs_unprivileged_on_a_read_only_root(name: str) -> None:
    pod = pod_spec(overlay(name))
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False
    for each in all_containers(pod):
        context = each["securityContext"]
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"]["drop"] == ["ALL"]
        assert context["readOnlyRootFilesystem"] is True


@pytest.mark.parametrize("name", OVERLAYS)
def test_every_path_the_engine_writes_to_is_on_a_volume(name: str) -> None:
    """The root is read-only: $HOME (caches), HF_HOME (downloads), the working directory and /tmp must be mounts."""
    pod = pod_spec(overlay(name))
    engine = engine_container(pod)
    env = {entry["name"]: entry["value"] for entry in engine["env"] if "value" in entry}
    for path in (env["HOME"], env["HF_HOME"], engine["workingDir"], "/tmp"):
        assert volume_of(pod, engine, path) is not None, path


@pytest.mark.parametrize("name", OVERLAYS)
def test_the_engine_gets_a_gpu_memory_backed_shared_memory_and_the_model_cache(name: str) -> None:
    pod = pod_spec(overlay(name))
    engine = engine_container(pod)
    assert engine["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert sum("nvidia.com/gpu" in each["resources"].get("limits", {}) for each in all_containers(pod)) == 1
    shm = volume_of(pod, engine, "/dev/shm")
    assert shm is not None
    assert shm["emptyDir"]["medium"] == "Memory"
    hf_home = next(entry["value"] for entry in engine["env"] if entry["name"] == "HF_HOME")
    cache = volume_of(pod, engine, hf_home)
    assert cache is not None
    assert cache["name"] == "model-cache"


def test_the_model_cache_component_puts_the_cache_on_a_claim_instead_of_an_emptydir(tmp_path: Path) -> None:
    docs = overlay_with_components("managed", ["model-cache-pvc"], tmp_path)
    (volume,) = [v for v in pod_spec(docs)["volumes"] if v["name"] == "model-cache"]
    assert volume == {"name": "model-cache", "persistentVolumeClaim": {"claimName": "flushgate-model-cache"}}
    assert one(docs, "PersistentVolumeClaim")["metadata"]["name"] == "flushgate-model-cache"


@pytest.mark.parametrize("name", OVERLAYS)
def test_the_pod_turns_off_service_links(name: str) -> None:
    assert pod_spec(overlay(name))["enableServiceLinks"] is False


def test_service_links_for_the_flushgate_service_would_stop_flushgate_from_starting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Why the pod turns them off: the Service named flushgate becomes FLUSHGATE_PORT=tcp://..., a setting."""
    links = service_link_env([one(overlay("sidecar"), "Service")])
    assert links["FLUSHGATE_PORT"].startswith("tcp://")
    for key, value in links.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit, match="FLUSHGATE_PORT"):
        build_parser()


@pytest.mark.parametrize("name", OVERLAYS)
def test_prometheus_annotations_name_the_gateway_port_and_metrics_path(name: str) -> None:
    docs = overlay(name)
    annotations = one(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == "/metrics"
    assert int(annotations["prometheus.io/port"]) == int(flag(serve_args(docs), "--port") or 0)


def test_the_servicemonitor_scrapes_the_gateway_service_port(tmp_path: Path) -> None:
    docs = overlay_with_components("sidecar", ["servicemonitor"], tmp_path)
    monitor = one(docs, "ServiceMonitor")["spec"]
    service = one(docs, "Service")
    assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["endpoints"]
    assert endpoint["path"] == "/metrics"
    assert endpoint["port"] in [port["name"] for port in service["spec"]["ports"]]


def test_the_hpa_example_scales_the_deployment_per_pod_and_owns_its_replicas(tmp_path: Path) -> None:
    docs = overlay_with_components("managed", ["hpa-inflight"], tmp_path)
    hpa = one(docs, "HorizontalPodAutoscaler")["spec"]
    deployment = one(docs, "Deployment")
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "flushgate"}
    assert deployment["metadata"]["name"] == "flushgate"
    (metric,) = hpa["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"].startswith("flushgate_")  # that flushgate serves it: test_k8s_probes
    assert "replicas" not in deployment["spec"]


@pytest.mark.parametrize("name", OVERLAYS)
def test_the_disruption_budget_selects_exactly_the_gateway_pods(name: str) -> None:
    docs = overlay(name)
    budget = one(docs, "PodDisruptionBudget")["spec"]
    deployment = one(docs, "Deployment")["spec"]
    assert budget["selector"]["matchLabels"]  # an empty selector would match every pod in the namespace
    assert budget["selector"]["matchLabels"] == deployment["selector"]["matchLabels"]
    assert budget["maxUnavailable"] == 1


def test_the_overlays_differ_only_in_how_the_engine_runs() -> None:
    """Probes, drain, security and volumes come from the one base, so the two deployments cannot drift apart."""
    sidecar, managed = (copy.deepcopy(pod_spec(overlay(name))) for name in OVERLAYS)
    for pod in (sidecar, managed):
        pod.pop("initContainers", None)
        for key in ("args", "env", "resources", "volumeMounts", "workingDir", "image"):
            pod["containers"][0].pop(key, None)
    assert sidecar == managed
