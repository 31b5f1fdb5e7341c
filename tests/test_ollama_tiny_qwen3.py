"""The tiny Qwen3 test model: built offline, once, with Qwen3's template and a reply that shows both modes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from flushgate.engine.model_folder import MARKER_NAME
from flushgate.engine.tiny_qwen3 import ensure_tiny_qwen3

QUESTION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the weather?"}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_tiny_qwen3(tmp_path_factory.mktemp("tiny") / "tiny-qwen3")


def test_building_twice_reuses_the_finished_folder(model_dir: Path) -> None:
    weights = model_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert ensure_tiny_qwen3(model_dir) == model_dir
    assert weights.stat().st_mtime_ns == before
    assert (model_dir / MARKER_NAME).is_file()


def test_a_folder_without_its_marker_is_rebuilt(tmp_path: Path) -> None:
    dest = tmp_path / "m"
    dest.mkdir()
    (dest / "config.json").write_text("{half written")
    ensure_tiny_qwen3(dest)
    assert (dest / "config.json").read_text().startswith("{\n")
    assert (dest / MARKER_NAME).is_file()


def render(model_dir: Path, **kwargs: Any) -> str:
    transformers = pytest.importorskip("transformers")  # installed with vLLM
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    return str(tokenizer.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True, **kwargs))


def test_chat_template_is_qwen3s_with_its_thinking_switch(model_dir: Path) -> None:
    thinking = render(model_dir, enable_thinking=True)
    assert thinking == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is the weather?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert render(model_dir) == thinking  # Qwen3 thinks unless told not to
    assert render(model_dir, enable_thinking=False) == thinking + "<think>\n\n</think>\n\n"


def reply(model_dir: Path, prompt: str) -> str:
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    return str(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=False))


def test_the_planted_reply_thinks_only_when_the_prompt_asks_for_thinking(model_dir: Path) -> None:
    assert reply(model_dir, render(model_dir)) == "<think>Thinking</think>\n\nHello!<|im_end|>"
    assert reply(model_dir, render(model_dir, enable_thinking=False)) == "Hello!<|im_end|>"
