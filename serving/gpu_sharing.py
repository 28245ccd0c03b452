"""Replicas that share a GPU (`num_gpus` below 1) and CUDA MPS.

Without MPS, the processes of one GPU take turns on it: the GPU time-slices between their
contexts, so a prefill step's large GEMMs and a decode step's memory-bound kernels never run
together. Under an MPS control daemon their kernels run side by side. Measured on one H200
(docs/benchmarks.md, 2026-12-02): 1P1D on one GPU went from 0.69-0.74x to 0.79-0.90x of the
engine alone on the Serve workload, prefill steps from ~178 to 99-129 ms. The daemon is the
node's, started before Ray (see the README, "One GPU, prefill and decode"), so a replica can
only look for it and say so when it is missing.
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


def assigned_gpu_share() -> float | None:
    """The GPU fraction Ray gave this actor; None outside a Ray worker."""
    try:
        import ray

        if not ray.is_initialized():
            return None
        return float(ray.get_runtime_context().get_assigned_resources().get("GPU", 0.0))
    except Exception:  # noqa: BLE001 - a best-effort hint, never a reason to fail a start
        return None


def warn_if_sharing_without_mps(device: str) -> str | None:
    """Logs (and returns) `sharing_warning` for this process."""
    message = sharing_warning(assigned_gpu_share(), device, mps_daemon_found())
    if message:
        log.warning(message)
    return message
