"""Small host-to-device copies that do not make the host wait for the GPU.

`torch.tensor(values, device="cuda")` (or `.to("cuda")` of a pageable tensor) copies
synchronously: the host waits until every kernel queued before the copy has run. With
overlapped scheduling a step is always in flight, so such a copy between two steps (a page
index for an import, a sampling table) stalls the step thread for the rest of the GPU's step
and leaves the GPU idle afterwards. Through pinned memory (torch's caching host allocator, so
no page-locking per call) the copy is queued on the stream and the host goes on.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def to_device_async(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on `device`, queued on the current stream (CUDA) or copied (CPU)."""
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def copy_from_host(dst: torch.Tensor, host: torch.Tensor) -> None:
    """`dst.copy_(host)`, queued on the current stream when `dst` is on a CUDA device."""
    if dst.is_cuda:
        dst.copy_(host.pin_memory(), non_blocking=True)
    else:
        dst.copy_(host)


def index_tensor(values: Sequence[int], device: torch.device) -> torch.Tensor:
    """`values` as an int64 tensor on `device`, without waiting for the GPU."""
    return to_device_async(torch.tensor(values, dtype=torch.long), device)
