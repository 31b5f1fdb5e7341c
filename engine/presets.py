"""Named engine set-ups: the vLLM arguments a deployment needs, with the reasons written down."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Preset:
    name: str
    summary: str
    args: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)


PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        Preset(
            name="qwen3-14b-fp8",
            summary="Qwen/Qwen3-14B-FP8 on one 80 GB A100/H100: prefix caching, Qwen3 reasoning and tool parsers",
            args=(
                # Chat turns share long prefixes (system prompt, history): reuse their KV cache.
                "--enable-prefix-caching",
                # Splits <think>...</think> into reasoning_content, so UIs can show or hide it.
                "--reasoning-parser",
                "qwen3",
                "--enable-auto-tool-choice",
                "--tool-call-parser",
                "hermes",
                # FP8 weights take ~15 GiB; 0.90 of 80 GiB leaves ~55 GiB of KV cache. At 160 KiB per token
                # (40 layers x 8 KV heads x 128 dims x K and V x 2 bytes) that is ~350k tokens: about ten
                # full-length conversations at once, and many more short ones.
                "--gpu-memory-utilization",
                "0.90",
                # Qwen3's native context; longer needs YaRN rope scaling, which costs quality on short prompts.
                "--max-model-len",
                "32768",
            ),
        ),
        Preset(
            name="cpu",
            summary="vLLM's CPU build with a small model: eager float32, a fixed KV cache size",
            # bf16 with compilation gave wrong text on the CPU build; eager float32 is correct and starts faster.
            args=("--enforce-eager", "--dtype", "float32"),
            # The CPU build sizes its KV cache from this variable (whole GiB), not from a memory fraction.
            env={"VLLM_CPU_KVCACHE_SPACE": "2"},
        ),
    )
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        known = ", ".join(sorted(PRESETS))
        raise ValueError(f"unknown preset {name!r}; known presets: {known}") from None
