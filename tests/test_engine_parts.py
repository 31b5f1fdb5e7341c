"""The engine's command line, presets and log phases, from vLLM's real output."""

from __future__ import annotations

from pathlib import Path

import pytest

from flushgate.config import Config, ConfigError
from flushgate.engine.command import VLLM_MODULE, build_spec
from flushgate.engine.logparse import LoadPhase, advance
from flushgate.engine.presets import PRESETS, get_preset

# Lines as vLLM 0.32 (CPU) and vLLM 0.26 (H100) print them, in order, with noise in between.
CPU_START = [
    "(APIServer pid=3660) INFO 11-25 14:35:09 [api_utils.py:347]  version 0.32.0",
    "(APIServer pid=3660) WARNING 11-25 14:35:16 [vllm.py:1703] Enforce eager set, disabling torch.compile, "
    "CUDAGraphs, and JIT kernel warmup.",
    "(EngineCore pid=4108) INFO 11-25 14:35:22 [core.py:133] Initializing a V1 LLM engine (v0.32.0) with config: "
    "model='/m', kv_cache_dtype=auto, enable_prefix_caching=True",
    "(Worker pid=4296) INFO 11-25 14:35:29 [cpu_model_runner.py:68] Starting to load model /m...",
    "Loading safetensors checkpoint shards: 100% Completed | 1/1 [00:01<00:00,  1.65s/it]",
    "(Worker pid=4296) INFO 11-25 14:35:33 [cpu_worker.py:260] Explicitly set (1.0/8.59) GiB for KV cache on node 0.",
    "(EngineCore pid=4108) INFO 11-25 14:35:35 [core.py:402] init engine (profile, create kv cache, warmup model) "
    "took 2.81 s",
    "(EngineCore pid=4108) WARNING 11-25 14:35:36 [vllm.py:1703] Enforce eager set, disabling torch.compile, ...",
    "(APIServer pid=3660) INFO 11-25 14:35:37 [entry.py:140] Starting vLLM server on http://127.0.0.1:8011",
    "INFO:     Application startup complete.",
]
GPU_START = [
    "(EngineCore pid=1159) INFO 11-25 13:08:40 [core.py:133] Initializing a V1 LLM engine (v0.26.0) with config: ...",
    "(EngineCore pid=1159) INFO 11-25 13:08:45 [gpu_model_runner.py:2600] Starting to load model /m...",
    "(EngineCore pid=1159) INFO 11-25 13:08:52 [backends.py:1094] Using cache directory: /root/.cache/vllm/"
    "torch_compile_cache/a3/rank_0_0/backbone for vLLM's torch.compile",
    "(EngineCore pid=1159) INFO 11-25 13:09:15 [backends.py:393] Compiling a graph for compile range (1, 8192) "
    "takes 23.20 s",
    "(EngineCore pid=1159) INFO 11-25 13:09:24 [gpu_worker.py:560] Available KV cache memory: 41.91 GiB",
    "(EngineCore pid=1159) INFO 11-25 13:09:24 [kv_cache_utils.py:2177] GPU KV cache size: 274,672 tokens",
    "(EngineCore pid=1159) INFO 11-25 13:09:36 [model_runner.py:747] Graph capturing finished in 12 secs, "
    "took 0.90 GiB",
    "(EngineCore pid=1159) INFO 11-25 13:09:58 [core.py:340] init engine (profile, create kv cache, warmup model) "
    "took 81.53 s (compilation: 42.29 s)",
    "(APIServer pid=1100) INFO 11-25 13:10:01 [api_server.py:1800] Starting vLLM API server 0 on http://0.0.0.0:8000",
]


def phases(lines: list[str]) -> list[LoadPhase]:
    seen: list[LoadPhase] = []
    phase = LoadPhase.STARTING
    for line in lines:
        phase = advance(phase, line)
        if not seen or seen[-1] is not phase:
            seen.append(phase)
    return seen


def test_cpu_start_up_lines_walk_through_the_phases_in_order() -> None:
    assert phases(CPU_START) == [
        LoadPhase.STARTING,
        LoadPhase.INITIALISING,
        LoadPhase.LOADING_WEIGHTS,
        LoadPhase.KV_CACHE,
        LoadPhase.STARTING_SERVER,
    ]


def test_gpu_start_up_lines_include_compiling_and_graph_capture() -> None:
    assert phases(GPU_START) == [
        LoadPhase.INITIALISING,
        LoadPhase.LOADING_WEIGHTS,
        LoadPhase.COMPILING,
        LoadPhase.KV_CACHE,
        LoadPhase.GRAPH_CAPTURE,
        LoadPhase.STARTING_SERVER,
    ]


def test_the_command_line_has_the_private_address_request_ids_preset_then_user_args(tmp_path: Path) -> None:
    model = tmp_path / "my-model"
    model.mkdir()
    spec = build_spec(
        str(model), python="/py", preset=get_preset("cpu"), extra_args=("--dtype", "bfloat16"), port=9123,
        base_env={"VLLM_CPU_KVCACHE_SPACE": "6"},
    )  # fmt: skip
    assert spec.argv[:3] == ("/py", "-m", VLLM_MODULE)
    args = list(spec.argv[3:])
    assert args[args.index("--host") + 1] == "127.0.0.1"
    assert args[args.index("--port") + 1] == "9123"
    assert "--enable-request-id-headers" in args
    assert args[args.index("--served-model-name") + 1] == "my-model"
    assert args[-2:] == ["--dtype", "bfloat16"]  # the user's own arguments come last, so they win in vLLM
    assert args.index("--enforce-eager") < len(args) - 2
    assert spec.env["VLLM_CPU_KVCACHE_SPACE"] == "6"  # the user's environment wins over the preset's
    assert spec.env["HF_HUB_OFFLINE"] == "1"  # a local folder never reaches for a hub
    assert spec.base_url == "http://127.0.0.1:9123"


def test_a_hub_model_id_is_served_under_its_own_name() -> None:
    spec = build_spec("Qwen/Qwen3-14B-FP8", python="/py", preset=get_preset("qwen3-14b-fp8"), port=9000, base_env={})
    args = list(spec.argv)
    assert args[args.index("--served-model-name") + 1] == "Qwen/Qwen3-14B-FP8"
    assert args[args.index("--reasoning-parser") + 1] == "qwen3"
    assert "--enable-prefix-caching" in args
    assert "HF_HUB_OFFLINE" not in spec.env


def test_presets_are_known_by_name_and_unknown_ones_are_refused() -> None:
    assert set(PRESETS) == {"cpu", "qwen3-14b-fp8"}
    with pytest.raises(ValueError, match="known presets: cpu, qwen3-14b-fp8"):
        get_preset("gpu-large")
    with pytest.raises(ConfigError, match="unknown --preset"):
        Config(model="/m", preset="gpu-large").validate()
    with pytest.raises(ConfigError, match="need --model"):
        Config(upstream="http://127.0.0.1:1", preset="cpu").validate()
    with pytest.raises(ConfigError, match="exactly one"):
        Config(upstream="http://127.0.0.1:1", model="/m").validate()


def test_a_managed_engine_keeps_idle_connections_a_second_longer_than_the_gateway_unless_told_otherwise() -> None:
    spec = build_spec("Qwen/Qwen3-14B-FP8", python="/py", port=9000, base_env={}, keepalive_s=60.0)
    assert spec.env["VLLM_HTTP_TIMEOUT_KEEP_ALIVE"] == "61"
    fraction = build_spec("Qwen/Qwen3-14B-FP8", python="/py", port=9000, base_env={}, keepalive_s=2.5)
    assert fraction.env["VLLM_HTTP_TIMEOUT_KEEP_ALIVE"] == "4"  # whole seconds, still longer than 2.5 + 1
    own = {"VLLM_HTTP_TIMEOUT_KEEP_ALIVE": "30"}
    assert build_spec("m", python="/py", port=9000, base_env=own, keepalive_s=29.0).env == {
        **own,
        "PYTHONUNBUFFERED": "1",
    }
    assert "VLLM_HTTP_TIMEOUT_KEEP_ALIVE" not in build_spec("m", python="/py", port=9000, base_env={}).env
