"""Replicas that share a GPU (`num_gpus` below 1) and CUDA MPS.

Without MPS, the processes of one GPU take turns on it: the GPU time-slices between their
contexts, so a prefill step's large GEMMs and a decode step's memory-bound kernels never run
together. Under an MPS control daemon their kernels run side by side. Measured on one H200
(docs/benchmarks.md, 2026-12-02): 1P1D on one GPU went from 0.69-0.74x to 0.79-0.90x of the
engine alone on the Serve workload, prefill steps from ~178 to 99-129 ms. The daemon is the
node's, started before Ray (see the README, "One GPU, prefill and decode"), so a replica can
only look for it and say so when it is missing. Likewise a replica with a GPU of its own says
that `engine.decode_hold_ms` does nothing there but delay tokens (engine/decode_hold.py).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

log = logging.getLogger("pdserve")

DEFAULT_PIPE_DIRECTORY = "/tmp/nvidia-mps"  # nvidia-cuda-mps-control's, without the variable


def mps_daemon_found(env: Mapping[str, str] = os.environ) -> bool:
    """True when an MPS control daemon's pipe is where this process's CUDA would look: the
    `control` pipe in CUDA_MPS_PIPE_DIRECTORY (or its default)."""
    pipe_dir = env.get("CUDA_MPS_PIPE_DIRECTORY") or DEFAULT_PIPE_DIRECTORY
    return os.path.exists(os.path.join(pipe_dir, "control"))


def sharing_warning(gpu_share: float | None, device: str, mps: bool) -> str | None:
    """What to tell the operator of a replica given `gpu_share` of a GPU (None: not known, e.g.
    outside Ray), or None when there is nothing to say."""
    if not device.startswith("cuda") or gpu_share is None or not 0 < gpu_share < 1 or mps:
        return None
    return (f"this replica has {gpu_share:g} of a GPU and no CUDA MPS daemon was found: the "
            f"replicas sharing the GPU will run in turns, not side by side. Side by side gives "
            f"more tokens/s, in turns a steadier TPOT: for the first, start a daemon before Ray "
            f"(`nvidia-cuda-mps-control -d`; README, \"One GPU, prefill and decode\")")


def hold_warning(gpu_share: float | None, device: str, decode_hold_ms: float) -> str | None:
    """What to tell the operator of a replica that holds its decode steps
    (`engine.decode_hold_ms`, engine/decode_hold.py) on a GPU of its own, where a held step
    speeds no prefill and only delays its rows' tokens; None when there is nothing to say."""
    if decode_hold_ms <= 0 or not device.startswith("cuda") or gpu_share is None or gpu_share < 1:
        return None
    return (f"engine.decode_hold_ms is {decode_hold_ms:g} on a replica with {gpu_share:g} GPU: "
            f"the hold is for a decode replica sharing its GPU with a prefill replica; here it "
            f"only delays tokens (set it to 0)")


def assigned_gpu_share() -> float | None:
    """The GPU fraction Ray gave this actor; None outside a Ray worker."""
    try:
        import ray

        if not ray.is_initialized():
            return None
        return float(ray.get_runtime_context().get_assigned_resources().get("GPU", 0.0))
    except Exception:  # noqa: BLE001 - a best-effort hint, never a reason to fail a start
        return None


def warn_about_sharing(device: str, decode_hold_ms: float = 0.0) -> list[str]:
    """Logs (and returns) `sharing_warning` and `hold_warning` for this process."""
    share = assigned_gpu_share()
    messages = [m for m in (sharing_warning(share, device, mps_daemon_found()),
                            hold_warning(share, device, decode_hold_ms)) if m]
    for message in messages:
        log.warning(message)
    return messages
