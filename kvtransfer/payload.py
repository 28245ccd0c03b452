"""The KV payload that crosses between replicas, and the checks made before it touches a pool.

In a process the pages are one tensor `[num_layers, num_pages, 2, page_size, Hkv, D]`; how they
travel (object store chunks, a CUDA IPC handle, the response itself) is the transport's business.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.attention.base import as_bytes


@dataclass
class KVPayload:
    data: torch.Tensor  # [L, P, 2, page_size, Hkv, D]; "meta" in a header (shape and dtype only)
    dtype: str  # torch dtype name of the pool, e.g. "float32", "bfloat16"
    page_size: int
    first_block: int  # the payload's pages hold blocks first_block .. first_block + P - 1
    block_hashes: list[int]  # chain hashes of the prompt's full blocks (all of them)
    fingerprint: str  # model_fingerprint() of the sender

    def __getstate__(self) -> dict:
        # Plain pickling (Ray, Serve responses) cannot rebuild a float8 tensor's storage: the
        # bytes travel as uint8, and __setstate__ views them back as the named dtype.
        state = dict(self.__dict__)
        if self.data.device.type != "meta":
            state["data"] = as_bytes(self.data)
        return state

    def __setstate__(self, state: dict) -> None:
        data = state["data"]
        want = getattr(torch, state["dtype"])
        if data.dtype != want and data.device.type != "meta":
            state["data"] = data.view(want)
        self.__dict__.update(state)

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    @staticmethod
    def from_tensor(data: torch.Tensor, page_size: int, first_block: int,
                    block_hashes: list[int], fingerprint: str) -> KVPayload:
        dtype = str(data.dtype).removeprefix("torch.")
        return KVPayload(data.detach().contiguous(), dtype, page_size, first_block,
                         list(block_hashes), fingerprint)

    def header(self) -> KVPayload:
        """This payload without its bytes: the data becomes a meta tensor of the same shape."""
        meta = torch.empty(self.data.shape, dtype=self.data.dtype, device="meta")
        return dataclasses.replace(self, data=meta)

    def check(self, *, dtype: torch.dtype, page_size: int, first_block: int,
              block_hashes: list[int], fingerprint: str, num_pages: int) -> None:
        """Raise ValueError unless this payload is exactly the KV the receiver asked for."""
        want = str(dtype).removeprefix("torch.")
        problems = []
        if self.fingerprint != fingerprint:
            problems.append(f"model fingerprint {self.fingerprint[:12]} != {fingerprint[:12]}")
        if self.dtype != want:
            # e.g. an fp8 prefill replica and a bf16 decode replica (engine.kv_cache_dtype)
            problems.append(f"KV dtype {self.dtype} sent, the receiving pool holds {want} "
                            "(prefill and decode need the same engine.kv_cache_dtype)")
        if self.page_size != page_size:
            problems.append(f"page size {self.page_size} != {page_size}")
        if self.first_block != first_block:
            problems.append(f"first block {self.first_block} != {first_block}")
        if self.block_hashes != list(block_hashes):
            problems.append("block hashes differ (not the same prompt)")
        if self.data.shape[1] != num_pages:
            problems.append(f"{self.data.shape[1]} pages sent, {num_pages} expected")
        if problems:
            raise ValueError("KV payload rejected: " + "; ".join(problems))


def model_fingerprint(model_path: str | Path, dtype: str, load_format: str, seed: int,
                      quantize: str | None = None) -> str:
    """Identifies the weights: config + each safetensors header (names, shapes, offsets) +
    file sizes (+ `quantize`: weights quantized at load compute other KV). Two replicas with
    equal fingerprints compute the same KV for the same tokens."""
    path = Path(model_path)
    h = hashlib.blake2b(digest_size=16)
    knobs = [dtype, load_format, seed if load_format == "dummy" else 0]
    if quantize is not None:  # appended only when set: fingerprints without it are unchanged
        knobs.append(quantize)
    h.update(json.dumps(knobs).encode())
    h.update((path / "config.json").read_bytes())
    if load_format != "dummy":
        for f in sorted(path.glob("*.safetensors")):
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                h.update(fh.read(n))
            h.update(str(f.stat().st_size).encode())
    return h.hexdigest()
