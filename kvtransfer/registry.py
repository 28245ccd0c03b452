"""KV transports by name. Each entry is imported only when chosen: `cuda_ipc` needs CUDA and
`ray` needs a Ray worker, neither of which a CPU unit test has. `nccl` moves KV GPU to GPU
(across devices and nodes), `gloo` is the same channel protocol on CPU."""

from __future__ import annotations

from importlib import import_module

from kvtransfer.transport import KVTransport

# name -> "module:class"
TRANSPORTS: dict[str, str] = {
    "ray": "kvtransfer.ray_object_store:RayObjectStoreTransport",
    "cuda_ipc": "kvtransfer.cuda_ipc:CudaIpcTransport",
    "inline": "kvtransfer.inline:InlineTransport",
    "nccl": "kvtransfer.channel_transport:NcclTransport",
    "gloo": "kvtransfer.channel_transport:GlooTransport",
}


def make_transport(name: str, timeout_s: float = 600.0) -> KVTransport:
    """The transport `name`; a sender holds a payload for its receiver at most `timeout_s`."""
    if name not in TRANSPORTS:
        raise ValueError(f"unknown KV transport {name!r}; valid: {sorted(TRANSPORTS)}")
    module, cls = TRANSPORTS[name].split(":")
    return getattr(import_module(module), cls)(timeout_s=timeout_s)
