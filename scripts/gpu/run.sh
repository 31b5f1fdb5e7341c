#!/usr/bin/env bash
# On the GPU machine (after .gpu/kit/gpu-stage.sh): flushgate managing vLLM with the Qwen3-14B shape (random
# weights), and the same streams measured engine-direct, through flushgate, and through a buffering nginx in
# front of flushgate. Usage: scripts/gpu/run.sh fp8|bf16   (results go to $OUT)
set -euo pipefail
cd "$(dirname "$0")/../.."
PHASE=$1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
. /root/site/env.sh
[ -d /root/fgsite ] || bash scripts/gpu/install.sh
export PYTHONPATH="$PYTHONPATH:/root/fgsite"  # vLLM's own pins come first
NGINX=/root/ng/usr/sbin/nginx
if ! "$NGINX" -v 2>/dev/null; then
    export NGINX_LD=/root/ng/lib/x86_64-linux-gnu:/root/ng/usr/lib/x86_64-linux-gnu
fi

case "$PHASE" in
    fp8) ENGINE_ARGS="--load-format dummy --attention-backend FLASH_ATTN --quantization fp8" ;;
    bf16) ENGINE_ARGS="--load-format dummy --attention-backend FLASH_ATTN --dtype bfloat16" ;;
    *) echo "usage: $0 fp8|bf16" >&2; exit 2 ;;
esac

# vLLM exports its per-request timing only if its OpenTelemetry imports work; otherwise say why and go on without.
if ! python3 -c 'import sys; from vllm.tracing.otel import is_otel_available as ok, otel_import_error_traceback as tb
print("vLLM OpenTelemetry available:", ok()); ok() or print(tb); sys.exit(0 if ok() else 1)'; then
    FLUSHGATE_RUN_FLAGS="${FLUSHGATE_RUN_FLAGS:-} --no-engine-timing"
fi

T0=$(date +%s.%N)
python3 -m flushgate serve --model .gpu/models/qwen3-14b-shape --served-model-name q14 --preset qwen3-14b-fp8 \
    --engine-arg="$ENGINE_ARGS" --port 8000 --log-format json ${FLUSHGATE_RUN_FLAGS:-} > "$OUT/flushgate-$PHASE.log" 2>&1 &
FG=$!
until curl -sf -o /dev/null http://127.0.0.1:8000/readyz; do
    kill -0 $FG 2>/dev/null || { tail -50 "$OUT/flushgate-$PHASE.log"; exit 1; }
    sleep 0.5
done
T_READY=$(date +%s.%N)
ENGINE=$(grep -m1 '"engine_starting"' "$OUT/flushgate-$PHASE.log" | python3 -c 'import json,sys; print(json.load(sys.stdin)["url"])')
echo "{\"phase\": \"$PHASE\", \"time_to_readyz_s\": $(python3 -c "print(round($T_READY - $T0, 1))")}" > "$OUT/ready-$PHASE.json"
cat "$OUT/ready-$PHASE.json"

# The buffering hop: nginx with proxy buffering and gzip on, ignoring X-Accel-Buffering (as a proxy set up for
# ordinary web pages does), in front of flushgate.
NG=/tmp/ng-$PHASE && mkdir -p $NG/logs
cat > $NG/nginx.conf <<CONF
worker_processes 1;
error_log $NG/logs/error.log;
pid $NG/nginx.pid;
events { worker_connections 1024; }
http {
    access_log off;
    client_body_temp_path $NG/body; proxy_temp_path $NG/proxy;
    fastcgi_temp_path $NG/fcgi; uwsgi_temp_path $NG/uwsgi; scgi_temp_path $NG/scgi;
    upstream fg { server 127.0.0.1:8000; keepalive 64; }
    server {
        listen 127.0.0.1:8080;
        location / {
            proxy_pass http://fg;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering on;
            proxy_ignore_headers X-Accel-Buffering;
            gzip on; gzip_proxied any; gzip_min_length 0; gzip_types text/event-stream application/json;
        }
    }
}
CONF
LD_LIBRARY_PATH=${NGINX_LD:-} "$NGINX" -p $NG -c $NG/nginx.conf

python3 scripts/gpu/paths_bench.py --model q14 --out "$OUT/paths-$PHASE.json" --repeat "${REPEAT:-3}" ${BENCH_FLAGS:-} \
    --path direct="$ENGINE" --path flushgate=http://127.0.0.1:8000 --path buffered=http://127.0.0.1:8080

LD_LIBRARY_PATH=${NGINX_LD:-} "$NGINX" -p $NG -c $NG/nginx.conf -s stop || true
kill -TERM $FG; wait $FG || true
grep -v '"engine_log"' "$OUT/flushgate-$PHASE.log" > "$OUT/records-$PHASE.jsonl" || true
gzip -f "$OUT/flushgate-$PHASE.log"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt"
