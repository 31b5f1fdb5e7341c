"""The Kubernetes manifests as the cluster would get them: ``kubectl kustomize`` of k8s/, read back as data."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "k8s"
OVERLAYS = ("sidecar", "managed")
COMPONENTS = ("servicemonitor", "hpa-inflight", "model-cache-pvc")
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")
# Seconds flushgate may take to close after its drain (cutting what is left, closing its server); the grace period
# is planned with it, and tests/test_k8s_probes.py holds the real process to it.
GATEWAY_CLOSE_S = 5.0

Manifest = dict[str, Any]


def tool(name: str) -> str:
    """A tool installed beside this Python by ``make k8s-tools``, else one on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} is not installed; `make k8s-tools` installs it")
    return found


def kustomize(directory: Path) -> list[Manifest]:
    result = subprocess.run(
        [tool("kubectl"), "kustomize", str(directory)], capture_output=True, text=True, timeout=120, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {directory} failed:\n{result.stderr}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@functools.cache
def _rendered_overlay(name: str) -> str:
    return yaml.safe_dump_all(kustomize(K8S / "overlays" / name))


def overlay(name: str) -> list[Manifest]:
    """One overlay's manifests, rendered once per run; each call returns a fresh copy to read or change."""
    return [doc for doc in yaml.safe_load_all(_rendered_overlay(name)) if doc]


def overlay_with_components(name: str, components: Iterable[str], workdir: Path) -> list[Manifest]:
    """An overlay with optional components added, as a user's own kustomization would add them."""
    workdir.mkdir(parents=True, exist_ok=True)
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(K8S / "overlays" / name, workdir)],
        "components": [os.path.relpath(K8S / "components" / component, workdir) for component in components],
    }
    (workdir / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return kustomize(workdir)


def one(docs: list[Manifest], kind: str) -> Manifest:
    (found,) = [doc for doc in docs if doc["kind"] == kind]
    return found


def pod_spec(docs: list[Manifest]) -> Manifest:
    spec: Manifest = one(docs, "Deployment")["spec"]["template"]["spec"]
    return spec


def all_containers(pod: Manifest) -> list[Manifest]:
    return [*pod.get("initContainers", []), *pod["containers"]]


def container(pod: Manifest, name: str) -> Manifest:
    (found,) = [each for each in all_containers(pod) if each["name"] == name]
    return found


def engine_container(pod: Manifest) -> Manifest:
    """The container vLLM runs in: the one that gets the GPU."""
    (found,) = [each for each in all_containers(pod) if "nvidia.com/gpu" in each["resources"].get("limits", {})]
    return found


def port_number(owner: Manifest, port: int | str) -> int:
    """A probe's or Service's port, named or numbered, as the container's port number."""
    if isinstance(port, int):
        return port
    (number,) = [entry["containerPort"] for entry in owner.get("ports", []) if entry.get("name") == port]
    return int(number)


def flag(args: list[str], name: str) -> str | None:
    """The value of ``--name=value`` or ``--name value`` in a container's args; None if absent."""
    for index, arg in enumerate(args):
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
        if arg == name and index + 1 < len(args):
            return args[index + 1]
    return None


def with_flags(args: list[str], **values: str) -> list[str]:
    """The args with some flags' values swapped (``model_dir="/x"`` swaps ``--model-dir``); each must be there."""
    wanted = {"--" + key.replace("_", "-"): value for key, value in values.items()}
    missing = [name for name in wanted if flag(args, name) is None]
    assert not missing, f"the manifest does not set {missing}"
    swapped: list[str] = []
    skip_next = False
    for arg in args:
        if skip_next:
            skip_next = False
            continue
        name = arg.split("=", 1)[0]
        if name in wanted:
            swapped.append(f"{name}={wanted[name]}")
            skip_next = "=" not in arg
        else:
            swapped.append(arg)
    return swapped


def split_flags(args: Iterable[str]) -> list[str]:
    """``--name=value`` written as ``--name value``, the form flushgate builds vLLM's command line in."""
    return [part for arg in args for part in (arg.split("=", 1) if arg.startswith("--") else [arg])]


def service_link_env(services: Iterable[Manifest], cluster_ip: str = "10.96.0.10") -> dict[str, str]:
    """The variables the kubelet puts in every container for each Service of the namespace, unless the pod
    sets ``enableServiceLinks: false`` (Docker-links style, as in the kubelet's envvars package)."""
    env: dict[str, str] = {}
    for service in services:
        prefix = service["metadata"]["name"].upper().replace("-", "_")
        ports = service["spec"]["ports"]
        env[f"{prefix}_SERVICE_HOST"] = cluster_ip
        env[f"{prefix}_SERVICE_PORT"] = str(ports[0]["port"])
        first_protocol = ports[0].get("protocol", "TCP").lower()
        env[f"{prefix}_PORT"] = f"{first_protocol}://{cluster_ip}:{ports[0]['port']}"
        for port in ports:
            protocol = port.get("protocol", "TCP")
            if "name" in port:
                env[f"{prefix}_SERVICE_PORT_{port['name'].upper().replace('-', '_')}"] = str(port["port"])
            link = f"{prefix}_PORT_{port['port']}_{protocol}"
            env[link] = f"{protocol.lower()}://{cluster_ip}:{port['port']}"
            env[link + "_PROTO"] = protocol.lower()
            env[link + "_PORT"] = str(port["port"])
            env[link + "_ADDR"] = cluster_ip
    return env


def kubelet_env(docs: list[Manifest], target: Manifest) -> dict[str, str]:
    """The literal environment a container gets: service links (unless turned off), then its own ``env``."""
    env: dict[str, str] = {}
    if pod_spec(docs).get("enableServiceLinks") is not False:
        env.update(service_link_env(doc for doc in docs if doc["kind"] == "Service"))
    env.update({entry["name"]: entry["value"] for entry in target.get("env", []) if "value" in entry})
    return env


def volume_of(pod: Manifest, target: Manifest, path: str) -> Manifest | None:
    """The pod volume that holds ``path`` inside ``target`` (the deepest mount above it), if any."""
    mounts = [m for m in target.get("volumeMounts", []) if (path + "/").startswith(m["mountPath"].rstrip("/") + "/")]
    if not mounts:
        return None
    deepest = max(mounts, key=lambda m: len(m["mountPath"]))
    volumes: list[Manifest] = [v for v in pod["volumes"] if v["name"] == deepest["name"]]
    (volume,) = volumes
    return volume
