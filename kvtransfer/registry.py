"""KV transports by name. Each entry is imported only when chosen: `cuda_ipc` needs CUDA and
`ray` needs a Ray worker, neither of which a CPU unit test has."""

from __future__ import annotations

from importlib import import_module

from kvtransfer.transport import KVTransport

# name -> "module:class"
TRANSPORTS: dict[str, str] = {
    "ray": "kvtransfer.ray_object_store:RayObjectStoreTransport",
    "cuda_ipc": "kvtransfer.cuda_ipc:CudaIpcTransport",
    "inline": "kvtransfer.inline:InlineTransport",
}


def make_transport(name: str) -> KVTransport:
    if name not in TRANSPORTS:
        raise ValueError(f"unknown KV transport {name!r}; valid: {sorted(TRANSPORTS)}")
    module, cls = TRANSPORTS[name].split(":")
    return getattr(import_module(module), cls)()
