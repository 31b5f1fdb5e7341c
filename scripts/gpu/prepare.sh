#!/usr/bin/env bash
# On the CPU machine: everything the GPU machine needs for scripts/gpu/run.sh, under .gpu/ (git-ignored via
# .git/info/exclude): vLLM's payload (from the shared GPU kit), the Qwen3-14B-shaped model folder, flushgate and
# its dependencies as cp312 wheels, and Debian's nginx for the buffering hop.
set -euo pipefail
cd "$(dirname "$0")/../.."
KIT=${KIT:-../shared/gpu}
PY=${PY:-.venv/bin/python}
mkdir -p .gpu .git/info
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude

[ -d .gpu/kit ] || { cp -r "$KIT" .gpu/kit; chmod -R u+w .gpu/kit; }
[ -f .gpu/p2/SHA256SUMS ] || bash .gpu/kit/build-payload.sh .gpu
[ -f .gpu/models/qwen3-14b-shape/config.json ] || \
    "$PY" .gpu/kit/make-tiny-model.py .gpu/models/qwen3-14b-shape --shape qwen3-14b --no-weights

# flushgate and what it needs beyond the GPU image and vLLM's payload; OpenTelemetry so vLLM can export its
# per-request spans to flushgate.
rm -rf .gpu/fg && mkdir -p .gpu/fg/wheels .gpu/fg/debs
"$PY" -m pip wheel -q --no-deps -w .gpu/fg/wheels .
PLAT="--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any"
"$PY" -m pip download -q --no-deps $PLAT -d .gpu/fg/wheels \
    uvloop httptools orjson structlog prometheus-client dnspython protobuf opentelemetry-proto opentelemetry-api opentelemetry-sdk \
    opentelemetry-exporter-otlp-proto-http opentelemetry-exporter-otlp-proto-grpc opentelemetry-exporter-otlp-proto-common grpcio \
    opentelemetry-exporter-otlp-common opentelemetry-exporter-http-transport \
    opentelemetry-semantic-conventions opentelemetry-semantic-conventions-ai googleapis-common-protos \
    importlib-metadata zipp typing-extensions \
    requests urllib3 idna charset-normalizer certifi

# nginx and the libraries it links, unpacked there with dpkg -x (the GPU machine has no package index).
(cd .gpu/fg/debs && apt-get download -q nginx nginx-common libpcre2-8-0 libssl3 zlib1g libcrypt1 >/dev/null)
du -sh .gpu/fg .gpu/p1 .gpu/p2 .gpu/models
