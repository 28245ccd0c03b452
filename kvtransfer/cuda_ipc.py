"""KV pages GPU to GPU on one node, never through host memory: the sender exports its page tensor
as a CUDA IPC handle and the receiver maps it, copies the pages into its own memory and lets go
of the mapping, all in a worker thread on a stream of its own, before `receive` returns. (The
mapping stays a while for the sender's next payloads in the same allocation:
kvtransfer/cuda_runtime.py's IpcMappings says why.)

Lifetime: the export is torch's (`_share_cuda_`, as `torch.multiprocessing` shares a CUDA
tensor): torch keeps the sender's block until the receiver releases the reference counter that
came with the handle, and frees it on a later `torch.cuda.ipc_collect()`, which `send` calls.
The receiver releases it once its copy is done. For a receiver that never does (it died
holding the handle) the sender drops the reference itself once `timeout_s` has passed
(kvtransfer/ipc_exports.py), and a receiver refuses a handle past its `accept_by` with
KVTransferLost, so no copy reads a block that the sender may free. A handle that never left
the sender (its prefill's caller went away during `send`) is discarded at once (`discard`).
Both replicas must see the same GPU (e.g. `num_gpus: 0.5` each on one device); across GPUs or
nodes use the `ray` transport.

The receive does not go through torch's unpickling of the tensor: torch unmaps in the tensor's
destructor holding the GIL, and an unmap waits for the GPU (`kvtransfer/cuda_runtime.py` says
what that cost). Here every call that can wait (map, copy, synchronize, unmap) is a ctypes call,
which holds no GIL; the engine's step thread and the event loop run meanwhile. The copy costs
one read and one write of the pages on the GPU (64 MiB for a 512-token Llama-3-8B prompt: ~30
us at H200 bandwidth) and as much memory while the request waits to be admitted; at most
`max_concurrent` receives copy at once.

`receive_into` (the decode replica's path) skips that buffer: it copies the pages from the
sender's memory straight into the pool pages reserved for the request (engine/page_import.py),
one 2D copy per run of consecutive pages, once the engine's stream has passed the reservation.
Between two steps the engine then only does the admission's bookkeeping; freeing the received
buffer there had cost the step thread ~1 ms a request on one H200 (docs/benchmarks.md, run 98).
These copies need no memory of their own, so they are not held to `max_concurrent`: a prefill
step hands over tens of prompts at once, and each of their imports waits for its copy in a
thread of the transport's own pool (`max_writers`), not in the event loop's default executor,
which other work shares. (On one H200 under MPS this did not measurably shorten the hand-over:
docs/benchmarks.md, run 134.)
"""

from __future__ import annotations

import asyncio
import dataclasses
import pickle
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import torch

from engine.page_import import PageImport
from kvtransfer.cuda_runtime import IPC_HANDLE_SIZE, PROCESS_MAPPINGS, CudaRuntime, cuda_runtime
from kvtransfer.ipc_exports import IpcExports, refused
from kvtransfer.payload import KVPayload
from kvtransfer.transport import KVTransferLost, KVTransport

T = TypeVar("T")


@dataclass(frozen=True)
class IpcPages:
    """Where a payload's bytes are: `nbytes` at `offset` in the sender's allocation `handle`."""
    device: int
    handle: bytes  # cudaIpcMemHandle_t of the allocation
    offset: int
    nbytes: int
    ref_counter: tuple[bytes, int]  # torch's (file, offset) counting the receiver's reference
    event: bytes | None  # cudaIpcEventHandle_t recorded after the pages were written, if needed
    accept_by: float  # time.monotonic() after which a receiver refuses it (ipc_exports.py)


def export_pages(data: torch.Tensor, exports: IpcExports) -> IpcPages:
    """(Sender.) Share a contiguous CUDA tensor's bytes; each call hands out one reference,
    which the receiver must release (or `exports` does, at its time)."""
    if not data.is_contiguous():
        raise ValueError("cuda_ipc transport exports contiguous tensors only")
    (device, shareable, _size, storage_offset, ref_file, ref_offset, event, event_sync
     ) = data.untyped_storage()._share_cuda_()
    accept_by = exports.add((ref_file, ref_offset), device)
    return IpcPages(device, cuda_malloc_handle(shareable),
                    storage_offset + data.storage_offset() * data.element_size(),
                    data.nbytes, (ref_file, ref_offset), event if event_sync else None,
                    accept_by)


def cuda_malloc_handle(shareable: bytes) -> bytes:
    """The cudaIpcMemHandle_t in torch's shareable handle: a version byte, a kind byte (b"c"
    for a cudaMalloc'd segment, b"e" for an expandable one), then the kind's handle."""
    if len(shareable) == IPC_HANDLE_SIZE + 2 and shareable[1:2] == b"c":
        return shareable[2:]
    raise ValueError("cuda_ipc transport: torch shared this block as an expandable segment "
                     "(PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True), which it cannot map; "
                     "run the prefill replica without it, or use the 'ray' transport")


class CudaIpcTransport(KVTransport):

    def __init__(self, timeout_s: float = 600.0, max_concurrent: int = 4,
                 max_writers: int = 64, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(timeout_s)
        self.exports = IpcExports(timeout_s, clock=clock)  # what this process shared
        self.max_concurrent = max_concurrent
        # receive_into's threads: each blocks (without the GIL) until its copy is done
        self._writers = ThreadPoolExecutor(max_writers, thread_name_prefix="cuda-ipc-into")
        self._slots: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # per event loop
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._lock = threading.Lock()
        self.mappings = PROCESS_MAPPINGS

    def send(self, payload: KVPayload) -> object:
        if not (isinstance(payload.data, torch.Tensor) and payload.data.is_cuda):
            raise ValueError("cuda_ipc transport needs the KV pages on a CUDA device")
        self.exports.expire()  # release for receivers that never did, after timeout_s
        torch.cuda.ipc_collect()  # free blocks whose receivers are done with them
        # No pages (nothing to share: CUDA has no handle for an empty block): the header says all.
        pages = export_pages(payload.data, self.exports) if payload.data.numel() else None
        return pickle.dumps((payload.header(), pages), protocol=pickle.HIGHEST_PROTOCOL)

    def discard(self, handle: object) -> None:
        """The receiver's reference, which the handle would have carried, is dropped now: torch
        frees the block at a later `ipc_collect`."""
        _, pages = pickle.loads(handle)
        if pages is not None:
            self.exports.drop(pages.ref_counter)

    async def receive(self, handle: object, device: torch.device | str) -> KVPayload:
        _check_handle(handle)
        want = torch.device(device)
        if want.type == "cuda" and want.index is None:
            want = torch.device("cuda", torch.cuda.current_device())
        async with self._slot():
            return await asyncio.to_thread(self.take, handle, want)

    async def release(self, handle: object, device: torch.device | str) -> None:
        """The receiver's reference goes back without a mapping or a copy: the sender frees the
        block at its next `ipc_collect`. A handle past its `accept_by` is left to the sender,
        which drops that reference itself."""
        _check_handle(handle)
        try:
            _, pages = self._accept(handle)
        except KVTransferLost:
            return
        if pages is not None:
            _release_sender(pages, torch.device(device))

    async def receive_into(self, handle: object, target: PageImport) -> KVPayload:
        _check_handle(handle)
        return await _to_thread_to_the_end(self.write_into, handle, target,
                                           executor=self._writers)

    def close(self) -> None:
        self._writers.shutdown(wait=False)

    def counters(self) -> dict[str, float]:
        """How many sender allocations this process mapped and unmapped (every receiver in it
        shares one table): far fewer maps than receives while mappings are reused; and the
        time its unmaps took."""
        return {"pdserve_kv_transfer_maps_total": self.mappings.maps,
                "pdserve_kv_transfer_unmaps_total": self.mappings.unmaps,
                "pdserve_kv_transfer_unmap_seconds_total": self.mappings.unmap_seconds}

    def _slot(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        slots = self._slots.get(loop)
        if slots is None:
            slots = self._slots[loop] = asyncio.Semaphore(self.max_concurrent)
        return slots

    def take(self, handle: bytes, want: torch.device) -> KVPayload:
        """(A worker thread; blocks, without the GIL while CUDA works.) Copy the sender's pages
        into a new tensor on `want`."""
        header, pages = self._accept(handle)
        meta = header.data
        if pages is None:
            return dataclasses.replace(header, data=torch.empty(meta.shape, dtype=meta.dtype,
                                                                device=want))

        def copy(runtime: CudaRuntime, src: int, stream: torch.cuda.Stream) -> torch.Tensor:
            with torch.cuda.stream(stream):  # allocated for use on the copy's stream
                data = torch.empty(pages.nbytes, dtype=torch.uint8, device=want)
            runtime.copy_async(data.data_ptr(), src, pages.nbytes, stream.cuda_stream)
            return data

        data = self._copy_out(pages, want, copy)  # done: any stream may read it
        return dataclasses.replace(header, data=data.view(meta.dtype).view(meta.shape))

    def write_into(self, handle: bytes, target: PageImport) -> KVPayload:
        """(A worker thread; blocks, without the GIL while CUDA works.) Copy the sender's pages
        into the pool pages of `target` once the engine's stream has passed their reservation.
        Returns the payload's header."""
        header, pages = self._accept(handle)
        meta = header.data
        # Checked before any write: a payload larger than the reservation would overrun into
        # other requests' pages.
        misfit = None
        if tuple(meta.shape) != target.shape or meta.dtype != target.dtype:
            misfit = (f"KV payload {tuple(meta.shape)} {meta.dtype} does not fit the reserved "
                      f"pages {target.shape} {target.dtype}")
        elif pages is not None and pages.nbytes != target.nbytes:
            misfit = (f"cuda_ipc transport: {pages.nbytes} bytes shared for a {target.nbytes}"
                      f"-byte payload")
        if misfit is not None:
            if pages is not None:  # the sender may free its block now
                _release_sender(pages, target.device)
            raise ValueError(misfit)
        if pages is None:
            return header

        def copy(runtime: CudaRuntime, src: int, stream: torch.cuda.Stream) -> None:
            for dst, run_src, width in target.copies(src):
                runtime.copy_2d_async(dst, target.layer_pitch, run_src, target.src_pitch, width,
                                      target.num_layers, stream.cuda_stream, target.device.index)

        self._copy_out(pages, target.device, copy, after=target.ready)  # the pages are in place
        return header

    def _accept(self, handle: bytes) -> tuple[KVPayload, IpcPages | None]:
        """The handle's (header, pages); KVTransferLost, with nothing released, if it came after
        its `accept_by`: its sender may free the pages while a copy runs, and releases them
        itself."""
        header, pages = pickle.loads(handle)
        if pages is not None and refused(pages.accept_by, self.exports.clock):
            late = self.exports.clock() - pages.accept_by
            raise KVTransferLost(f"cuda_ipc transport: a handle {late:.1f} s past its accept_by "
                                 f"(timeout_s {self.timeout_s:g}); its sender frees the pages")
        return header, pages

    def _copy_out(self, pages: IpcPages, device: torch.device,
                  copy: Callable[[CudaRuntime, int, torch.cuda.Stream], T],
                  after: torch.cuda.Event | None = None) -> T:
        """(A worker thread.) Map the sender's pages, queue `copy(runtime, their address,
        stream)` on this transport's stream for `device` (behind the sender's writes and the
        event `after`), wait for the stream, let go of the mapping, and release the sender's
        block whatever happened. Returns what `copy` returned."""
        try:
            _check_device(pages, device)
            runtime, stream = cuda_runtime(), self._stream(device)
            runtime.set_device(device.index)  # this thread's context: where the handle is mapped
            if after is not None:
                stream.wait_event(after)
            base = self.mappings.acquire(pages.handle, device.index)
            try:
                if pages.event is not None:  # the sender's gather may still be running
                    runtime.wait_ipc_event(stream.cuda_stream, pages.event)
                out = copy(runtime, base + pages.offset, stream)
            finally:  # no copy may still read the mapping when it goes, nor write after we return
                try:
                    runtime.synchronize(stream.cuda_stream)
                finally:
                    self.mappings.release(pages.handle)
        finally:
            _release_sender(pages, device)
        return out

    def _stream(self, device: torch.device) -> torch.cuda.Stream:
        """The copies' stream on `device`, at the highest stream priority: the copies are short
        and a request waits for each, while the engine's kernels queue whole steps. (A decode
        replica below normal MPS client priority gets the GPU last; its stream priorities still
        order its own work.)"""
        with self._lock:
            stream = self._streams.get(device)
            if stream is None:
                # torch clamps a priority beyond the device's range to the range's end
                stream = self._streams[device] = torch.cuda.Stream(device, priority=-100)
            return stream


def _check_handle(handle: object) -> None:
    if not isinstance(handle, bytes):
        raise TypeError(f"cuda_ipc transport got {type(handle).__name__}, not bytes")


def _release_sender(pages: IpcPages, device: torch.device) -> None:
    """Drop the receiver's reference on the sender's block (torch frees it on the sender's next
    `ipc_collect`)."""
    torch.UntypedStorage._release_ipc_counter(*pages.ref_counter, device=device)


def _check_device(pages: IpcPages, want: torch.device) -> None:
    if pages.device != want.index:
        raise ValueError(f"cuda_ipc transport: pages are on cuda:{pages.device}, the receiver "
                         f"runs on {want}; use the 'ray' transport across GPUs")


async def _to_thread_to_the_end(fn, *args, executor: Executor | None = None):
    """fn(*args) in a thread of `executor` (None: the loop's default). A caller cancelled
    meanwhile is cancelled only once fn has returned: fn writes into pages that the caller
    frees next."""
    task = asyncio.ensure_future(asyncio.get_running_loop().run_in_executor(executor, fn, *args))
    cancelled = False
    while not task.done():
        try:
            await asyncio.wait({task})
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        task.exception()  # retrieved: the caller hears of its cancellation, not of fn's error
        raise asyncio.CancelledError
    return task.result()
