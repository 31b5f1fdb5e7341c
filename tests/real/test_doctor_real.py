"""``doctor probe`` against a real vLLM on the CPU: the engine and flushgate in front of it are both clean."""

from __future__ import annotations

import pytest

from flushgate.doctor.probe import Path, ProbeSettings, probe
from tests.real.conftest import GatewayProcess

MAX_TOKENS = 48


@pytest.mark.timeout(900)  # may be the first test to start the shared engine
async def test_probe_measures_real_vllm_and_finds_both_paths_clean(smol_gateway: GatewayProcess) -> None:
    paths = [
        Path.parse(f"engine={smol_gateway.engine['url']}", "openai"),
        Path.parse(f"flushgate={smol_gateway.url}", "openai"),
    ]
    report = await probe(paths, ProbeSettings(max_tokens=MAX_TOKENS, requests=3, warmup=1))
    assert report.model == "smollm2-135m-instruct"  # asked the engine for its model
    assert 1 <= report.engine.gap_ms <= 1000
    for result in report.paths:
        assert result.verdict == "clean", [finding.text for finding in result.findings]
        assert result.measures.tokens > MAX_TOKENS // 2
        assert result.measures.tokens_per_read is not None
        assert result.measures.tokens_per_read < 1.5  # vLLM sends one token per event, flushgate passes each on
        assert all(run.ending == "complete" for run in result.runs)


async def test_probe_speaks_ollama_to_flushgate_in_front_of_real_vllm(smol_gateway: GatewayProcess) -> None:
    report = await probe(
        [Path.parse(f"flushgate={smol_gateway.url}", "ollama")],
        ProbeSettings(api="ollama", max_tokens=MAX_TOKENS, requests=2, warmup=1),
    )
    (result,) = report.paths
    assert result.url.endswith("/api/chat")
    assert result.verdict == "clean", [finding.text for finding in result.findings]
    assert result.measures.tokens > MAX_TOKENS // 2
    assert all(run.headers.get("content-type", "").startswith("application/x-ndjson") for run in result.runs)
