"""XQADecode: decode attention (one query per row) over paged KV through the XQA kernel.

XQA is TensorRT-LLM's decode kernel for grouped-query attention, as FlashInfer ships it
(`flashinfer.xqa`). It takes no plan: a row-major block table `[rows, width]` of page ids and
each row's KV length sit on the device, and the kernel splits long rows over CTAs and reduces
the pieces itself, one launch per layer. Two kernels come in one build:
- `gmma` (Hopper, fp8 pages only): warpgroup MMAs in fp8; the query and the softmax weights are
  rounded to e4m3 too, so its output is within ~4% (relative norm) of bf16 math over the same
  pages;
- `generic`: converts the pages to the query's dtype and computes in bf16/fp16.

Why: over fp8 pages FlashInfer 0.7.2's FA2 decode kernel reads at 1.6-2.1 TB/s, no faster
than over bf16 pages, so fp8 KV saved no decode time (docs/fp8.md); XQA's `gmma` kernel reads
them at 3.3-3.7 TB/s from 32 rows up (H200, run 77, `python -m bench.gpu_decode_attention`).

Contract: `plan(meta, rows)` writes the block table and lengths of a decode-only step's
`meta.batch_size` requests into fixed buffers, then `rows - batch_size` padding rows of length 1
on `scratch_page`; it reads host lists only. `run(q [rows, Hq, D], kv_cache)` -> [rows, Hq, D].
The buffers never move once made (`max_rows` x `width` pages), so a CUDA graph may capture
`run`; a step whose rows or pages exceed them does not fit (`fits`).
"""

from __future__ import annotations

import logging
import os

import numpy as np
import torch

from engine.attention.base import AttentionMetadata
from engine.host_copy import copy_from_host, to_device_async

log = logging.getLogger(__name__)

# Plain decode over fp8 pages: XQA's Hopper fp8 kernel (`gmma`), its bf16-math one (`generic`)
# or FlashInfer's FA2 decode wrapper (`fa2`). PDSERVE_FP8_DECODE picks one for measurements.
FP8_DECODE_KERNELS = ("gmma", "generic", "fa2")
# Over bf16/fp16 pages FA2 decodes: XQA's generic kernel was no faster in the engine's graphs
# at one row (step / floor 1.248-1.250 against 1.238-1.245) and slower at 32 rows (1.49
# against 1.34-1.35; H200 run 82), though it timed 8.8 against 10.2 us a layer alone (run 77).

# XQA's multi-CTA reduction counts arrivals in uint32 semaphores that must start at zero (each
# launch leaves them at zero); partial results go to the scratch after them. FlashInfer's own
# entry point reserves 8 MiB of semaphores; a Llama-3-8B step uses far less scratch than this.
SEMAPHORE_BYTES = 8 * 1024 * 1024
SCRATCH_BYTES = 24 * 1024 * 1024


def table_positions(kv_lens: list[int], page_size: int, width: int) -> np.ndarray:
    """[nnz_pages] int64: where each page of `kv_indices` (each request's pages in batch order)
    lands in a row-major `[rows, width]` block table."""
    counts = -(-np.asarray(kv_lens, dtype=np.int64) // page_size)  # [B]
    starts = np.cumsum(counts) - counts  # [B]: each request's first page in kv_indices
    rows = np.arange(len(counts), dtype=np.int64) * width  # [B]
    return np.arange(int(counts.sum()), dtype=np.int64) + np.repeat(rows - starts, counts)


class XQADecode:
    """One set of XQA buffers and the kernel that reads them (the module docstring's contract)."""

    def __init__(self, get_xqa_module, dtype: torch.dtype, kv_dtype: torch.dtype, num_q_heads: int,
                 num_kv_heads: int, head_dim: int, page_size: int, max_rows: int, width: int,
                 scratch_page: int, workspace: torch.Tensor, device: torch.device,
                 kernel: str) -> None:
        if kernel not in ("gmma", "generic"):
            raise ValueError(f"unknown XQA kernel {kernel!r}; valid: ['generic', 'gmma']")
        if kernel == "gmma" and kv_dtype != torch.float8_e4m3fn:
            raise ValueError("XQA's gmma kernel reads fp8 pages only")
        # flashinfer.xqa.get_xqa_module: builds (JIT) or loads the kernels of one configuration
        self._op = get_xqa_module(dtype, kv_dtype, page_size, head_dim,
                                  num_q_heads // num_kv_heads, False, dtype, 1).xqa
        cuda = device.type == "cuda"  # else a test's stand-in for the kernel
        self._sm_count = (torch.cuda.get_device_properties(device).multi_processor_count
                          if cuda else 1)
        # Programmatic dependent launch, as FlashInfer's own entry point enables it from SM90
        self._pdl = cuda and torch.cuda.get_device_capability(device)[0] >= 9
        self.gmma = kernel == "gmma"
        self.num_kv_heads, self.page_size, self.width = num_kv_heads, page_size, width
        self.scratch_page = scratch_page
        self.table = torch.zeros(max_rows, width, dtype=torch.int32, device=device)
        self.lens = torch.ones(max_rows, dtype=torch.int32, device=device)  # read as uint32
        self.semaphores = workspace[:SEMAPHORE_BYTES]
        self.scratch = workspace[SEMAPHORE_BYTES:]
        self.rows = 0  # of the last plan

    def fits(self, meta: AttentionMetadata, rows: int) -> bool:
        return (rows <= self.table.shape[0]
                and max(meta.kv_lens_host, default=0) <= self.width * self.page_size)

    def plan(self, meta: AttentionMetadata, rows: int) -> None:
        assert meta.num_decode_only and self.fits(meta, rows)
        n = meta.batch_size
        pos = table_positions(meta.kv_lens_host, self.page_size, self.width)
        flat = self.table.view(-1)
        flat.index_copy_(0, to_device_async(torch.from_numpy(pos), flat.device),
                         meta.kv_indices)
        if rows > n:
            self.table[n:rows, 0].fill_(self.scratch_page)
        lens = np.ones(rows, dtype=np.int32)
        lens[:n] = meta.kv_lens_host
        copy_from_host(self.lens[:rows], torch.from_numpy(lens))
        self.rows = rows

    def run(self, q: torch.Tensor, kv_cache: torch.Tensor) -> torch.Tensor:
        """q [rows, Hq, D] -> [rows, Hq, D]; kv_cache [pages, 2, page_size, Hkv, D] (NHD)."""
        rows = self.rows
        q = q.contiguous()  # the kernel takes dense rows; the model's q may be a view of qkv
        out = torch.empty_like(q)
        k, v = kv_cache.unbind(1)  # [pages, page_size, Hkv, D] each, page stride kept
        # q_scale 1.0: the kernel applies 1/sqrt(D) itself; K/V scales are KV_FP8_SCALE (1.0).
        self._op(self.gmma, self._sm_count, self.num_kv_heads, 0, 1.0, out.unsqueeze(1), 1.0,
                 q.unsqueeze(1), None, k, v, None, None, self.table[:rows],
                 self.width * self.page_size, self.lens[:rows].view(torch.uint32).unsqueeze(1),
                 rows, 1.0, self.semaphores, self.scratch, self._pdl, 1, None, None)
        return out


class XQAKernels:
    """A backend's XQA decode: the kernel, one workspace (semaphores kept at zero, which the FA2
    wrappers' shared workspace would not keep), and the `XQADecode` buffers of eager steps,
    made again twice as large when a step outgrows them. `make` builds a graph's (fixed)."""

    def __init__(self, get_xqa_module, kernel: str, dtype: torch.dtype, kv_dtype: torch.dtype,
                 num_q_heads: int, num_kv_heads: int, head_dim: int, page_size: int,
                 max_num_seqs: int, device: torch.device) -> None:
        self.kernel, self.page_size, self.max_num_seqs = kernel, page_size, max_num_seqs
        self.workspace = torch.zeros(SEMAPHORE_BYTES + SCRATCH_BYTES, dtype=torch.uint8,
                                     device=device)
        self._args = (get_xqa_module, dtype, kv_dtype, num_q_heads, num_kv_heads, head_dim,
                      page_size)
        self.device = device
        self._eager = self.make(1, 1, 0)  # builds (JIT) or loads the kernel now

    def make(self, max_rows: int, width: int, scratch_page: int) -> XQADecode:
        return XQADecode(*self._args, max_rows, width, scratch_page, self.workspace,
                         self.device, self.kernel)

    def eager(self, meta: AttentionMetadata) -> XQADecode:
        """The eager decode's buffers, holding this step."""
        x = self._eager
        if not x.fits(meta, meta.batch_size):
            pages = -(-max(meta.kv_lens_host) // self.page_size)
            rows = max(meta.batch_size, self.max_num_seqs, x.table.shape[0])
            self._eager = x = self.make(rows, max(pages, 2 * x.width, 64), 0)
        return x


def decode_kernels(fp8_choice: str | None, get_xqa_module, dtype: torch.dtype,
                   kv_dtype: torch.dtype, num_q_heads: int, num_kv_heads: int, head_dim: int,
                   page_size: int, max_num_seqs: int, device: torch.device) -> XQAKernels | None:
    """XQA for plain decode over fp8 pages, or None where FA2 runs it: `fp8_choice`, else
    $PDSERVE_FP8_DECODE, else `gmma`. None for bf16/fp16 pages, for `fa2`, on GPUs other than
    Hopper (the only ones XQA was measured on; FlashInfer ships it for SM90/100/120 only), and
    where XQA cannot be built (FlashInfer without its XQA sources: the reason is logged)."""
    choice = fp8_choice or os.environ.get("PDSERVE_FP8_DECODE", "gmma")
    if choice not in FP8_DECODE_KERNELS:
        raise ValueError(f"unknown fp8 decode kernel {choice!r}; valid: "
                         f"{list(FP8_DECODE_KERNELS)}")
    if kv_dtype != torch.float8_e4m3fn or choice == "fa2":
        return None
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] != 9:
        return None  # (a CPU device: the tests' stand-in for the kernel)
    try:
        return XQAKernels(get_xqa_module, choice, dtype, kv_dtype, num_q_heads, num_kv_heads,
                          head_dim, page_size, max_num_seqs, device)
    except Exception as e:  # noqa: BLE001 - any build failure: FA2 runs these steps
        log.warning("fp8 decode stays on FlashInfer's FA2 kernel: XQA is not available: "
                    "%s: %s", type(e).__name__, e)
        return None
