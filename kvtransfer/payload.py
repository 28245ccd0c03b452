"""The KV payload that crosses the wire, and the checks made before it touches a pool.

Page data travels as one numpy array `[num_layers, num_pages, 2, page_size, Hkv, D]` (bf16 as
its raw 16-bit pattern: numpy has no bfloat16), so Ray's object store can share it zero-copy.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

_RAW = {torch.bfloat16: (torch.int16, "bfloat16")}


@dataclass
class KVPayload:
    data: np.ndarray | torch.Tensor  # [L, P, 2, page_size, Hkv, D]; a tensor: device transports
    dtype: str  # torch dtype name of the pool, e.g. "float32", "bfloat16"
    page_size: int
    first_block: int  # the payload's pages hold blocks first_block .. first_block + P - 1
    block_hashes: list[int]  # chain hashes of the prompt's full blocks (all of them)
    fingerprint: str  # model_fingerprint() of the sender

    @property
    def nbytes(self) -> int:
        if isinstance(self.data, torch.Tensor):
            return self.data.numel() * self.data.element_size()
        return int(self.data.nbytes)

    @staticmethod
    def from_tensor(data: torch.Tensor, page_size: int, first_block: int,
                    block_hashes: list[int], fingerprint: str,
                    on_device: bool = False) -> KVPayload:
        """`on_device`: keep the pages where they are (for transports that map device memory)."""
        dtype = str(data.dtype).removeprefix("torch.")
        if on_device:
            return KVPayload(data.detach().contiguous(), dtype, page_size, first_block,
                             list(block_hashes), fingerprint)
        data = data.detach().cpu()
        if data.dtype in _RAW:
            data = data.view(_RAW[data.dtype][0])
        return KVPayload(data.numpy(), dtype, page_size, first_block, list(block_hashes),
                         fingerprint)

    def to_tensor(self) -> torch.Tensor:
        if isinstance(self.data, torch.Tensor):
            return self.data
        # The object store hands out read-only zero-copy arrays; the tensor is only ever read
        # (KVPool.write_pages copies it into the pool), so no defensive copy is made.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            t = torch.from_numpy(np.ascontiguousarray(self.data))
        if self.dtype == "bfloat16":
            t = t.view(torch.bfloat16)
        return t

    def check(self, *, dtype: torch.dtype, page_size: int, first_block: int,
              block_hashes: list[int], fingerprint: str, num_pages: int) -> None:
        """Raise ValueError unless this payload is exactly the KV the receiver asked for."""
        want = str(dtype).removeprefix("torch.")
        problems = []
        if self.fingerprint != fingerprint:
            problems.append(f"model fingerprint {self.fingerprint[:12]} != {fingerprint[:12]}")
        if self.dtype != want:
            problems.append(f"dtype {self.dtype} != {want}")
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


def model_fingerprint(model_path: str | Path, dtype: str, load_format: str, seed: int) -> str:
    """Identifies the weights: config + each safetensors header (names, shapes, offsets) +
    file sizes. Two replicas with equal fingerprints compute the same KV for the same tokens."""
    path = Path(model_path)
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps([dtype, load_format, seed if load_format == "dummy" else 0]).encode())
    h.update((path / "config.json").read_bytes())
    if load_format != "dummy":
        for f in sorted(path.glob("*.safetensors")):
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                h.update(fh.read(n))
            h.update(str(f.stat().st_size).encode())
    return h.hexdigest()
