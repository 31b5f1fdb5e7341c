#!/usr/bin/env bash
# On the GPU machine: flushgate's wheels into /root/fgsite and Debian's nginx into /root/ng (no package index
# there). Idempotent; run with the first job so later jobs need not carry .gpu/fg.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ ! -d /root/fgsite ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /root/fgsite .gpu/fg/wheels/*.whl
fi
if [ ! -x /root/ng/usr/sbin/nginx ]; then
    for deb in .gpu/fg/debs/*.deb; do dpkg -x "$deb" /root/ng; done
fi
PYTHONPATH=/root/fgsite python3 -c "import flushgate, uvloop, orjson, structlog; print('flushgate', flushgate.__version__)"
/root/ng/usr/sbin/nginx -v 2>&1 || LD_LIBRARY_PATH=/root/ng/lib/x86_64-linux-gnu:/root/ng/usr/lib/x86_64-linux-gnu \
    /root/ng/usr/sbin/nginx -v
