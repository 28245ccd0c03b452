"""The CUDA runtime calls of a `cuda_ipc` receive, made through ctypes so that none of them holds
the GIL while it runs (ctypes releases it around every foreign call).

Why not torch's own mapping (`torch.multiprocessing`'s reductions): torch unmaps a received
block (`cudaIpcCloseMemHandle`) inside the tensor's destructor, which runs holding the GIL. An
unmap waits for the GPU; under CUDA MPS it waits for the other replica's kernels too. A py-spy
profile of the decode replica (1P1D under MPS on one H200, 2026-12-02) found the GIL held there
18% of the time, and the engine's step thread waiting for it between steps (docs/benchmarks.md,
run 49).

The library is the one torch loaded (found in /proc/self/maps), so these calls share torch's
CUDA contexts and its current device per thread.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import torch

IPC_HANDLE_SIZE = 64  # bytes of cudaIpcMemHandle_t and of cudaIpcEventHandle_t
_LAZY_ENABLE_PEER_ACCESS = 1  # cudaIpcMemLazyEnablePeerAccess
_DEVICE_TO_DEVICE = 3  # cudaMemcpyDeviceToDevice
_MAX_PITCH = 11  # cudaDevAttrMaxPitch: the largest pitch cudaMemcpy2D* take

log = logging.getLogger(__name__)


class _IpcHandle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_char * IPC_HANDLE_SIZE)]


def _handle(raw: bytes) -> _IpcHandle:
    if len(raw) != IPC_HANDLE_SIZE:
        raise ValueError(f"a CUDA IPC handle has {IPC_HANDLE_SIZE} bytes, not {len(raw)}")
    return _IpcHandle.from_buffer_copy(raw)


class CudaRuntime:
    """Thin typed wrappers; each raises RuntimeError with CUDA's message when a call fails."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.lib = lib
        p, i, u, s = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint, ctypes.c_size_t
        for name, args in (
                ("cudaSetDevice", [i]),
                ("cudaIpcOpenMemHandle", [ctypes.POINTER(p), _IpcHandle, u]),
                ("cudaIpcCloseMemHandle", [p]),
                ("cudaIpcOpenEventHandle", [ctypes.POINTER(p), _IpcHandle]),
                ("cudaEventDestroy", [p]),
                ("cudaStreamWaitEvent", [p, p, u]),
                ("cudaMemcpyAsync", [p, p, s, i, p]),
                ("cudaMemcpy2DAsync", [p, s, p, s, s, s, i, p]),
                ("cudaDeviceGetAttribute", [ctypes.POINTER(i), i, i]),
                ("cudaStreamSynchronize", [p])):
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, i
        lib.cudaGetErrorString.argtypes, lib.cudaGetErrorString.restype = [i], ctypes.c_char_p

        self._max_pitch: dict[int, int] = {}

    def _check(self, err: int, what: str) -> None:
        if err:
            raise RuntimeError(f"{what}: {self.lib.cudaGetErrorString(err).decode()}")

    def set_device(self, index: int) -> None:
        self._check(self.lib.cudaSetDevice(index), "cudaSetDevice")

    def open_mem(self, handle: bytes) -> int:
        ptr = ctypes.c_void_p()
        self._check(self.lib.cudaIpcOpenMemHandle(ctypes.byref(ptr), _handle(handle),
                                                  _LAZY_ENABLE_PEER_ACCESS),
                    "cudaIpcOpenMemHandle")
        return ptr.value

    def close_mem(self, ptr: int) -> None:
        self._check(self.lib.cudaIpcCloseMemHandle(ptr), "cudaIpcCloseMemHandle")

    def wait_ipc_event(self, stream: int, handle: bytes) -> None:
        """Make `stream` wait for the event another process recorded (and exported)."""
        event = ctypes.c_void_p()
        self._check(self.lib.cudaIpcOpenEventHandle(ctypes.byref(event), _handle(handle)),
                    "cudaIpcOpenEventHandle")
        try:
            self._check(self.lib.cudaStreamWaitEvent(stream, event, 0), "cudaStreamWaitEvent")
        finally:  # the wait already queued stays valid without the event object
            self.lib.cudaEventDestroy(event)

    def copy_async(self, dst: int, src: int, nbytes: int, stream: int) -> None:
        self._check(self.lib.cudaMemcpyAsync(dst, src, nbytes, _DEVICE_TO_DEVICE, stream),
                    "cudaMemcpyAsync")

    def copy_2d_async(self, dst: int, dst_pitch: int, src: int, src_pitch: int, width: int,
                      height: int, stream: int, device: int) -> None:
        """`height` rows of `width` bytes, `src_pitch` apart at `src` and `dst_pitch` apart at
        `dst`, on `device`: one call where both pitches are within the device's limit, else a
        copy a row."""
        if max(dst_pitch, src_pitch) <= self.max_pitch(device):
            self._check(self.lib.cudaMemcpy2DAsync(dst, dst_pitch, src, src_pitch, width, height,
                                                   _DEVICE_TO_DEVICE, stream),
                        "cudaMemcpy2DAsync")
            return
        for row in range(height):
            self.copy_async(dst + row * dst_pitch, src + row * src_pitch, width, stream)

    def max_pitch(self, device: int) -> int:
        """cudaDevAttrMaxPitch of `device` (asked once per device)."""
        pitch = self._max_pitch.get(device)
        if pitch is None:
            value = ctypes.c_int()
            self._check(self.lib.cudaDeviceGetAttribute(ctypes.byref(value), _MAX_PITCH, device),
                        "cudaDeviceGetAttribute")
            pitch = self._max_pitch[device] = value.value
        return pitch

    def synchronize(self, stream: int) -> None:
        self._check(self.lib.cudaStreamSynchronize(stream), "cudaStreamSynchronize")


@cache
def cuda_runtime() -> CudaRuntime:
    """The CUDA runtime library that torch uses in this process."""
    torch.cuda.init()
    with open("/proc/self/maps") as maps:
        paths = {line.split()[-1] for line in maps if "libcudart.so" in line}
    if not paths:
        raise RuntimeError("cuda_ipc transport: torch's libcudart is not loaded in this process")
    return CudaRuntime(ctypes.CDLL(sorted(paths)[0]))


@dataclass
class _Mapping:
    device: int  # where it was mapped (its unmap runs there)
    base: int | None = None  # None while a thread maps or unmaps it
    users: int = 0
    idle_since: float | None = None  # when its last user let go


class IpcMappings:
    """Another process's allocations mapped into this one, each at most once at a time (CUDA
    maps a handle once per process): `acquire` maps on first use and counts users; `release`
    leaves a mapping nobody uses open for `linger_s`, and a sweeper thread unmaps it after that.
    Thread-safe; the map and unmap calls hold neither the GIL nor this table's lock.

    Why it lingers: the sender's caching allocator hands out the same few blocks again and
    again, so the next payload is most often in an allocation already mapped. An unmap waits
    for the GPU, under CUDA MPS for the other replica's kernels as well (docs/benchmarks.md, run
    49). Unmapped at each payload's end under this table's lock, the next receive's map waited
    behind it: 1P1D under MPS on one H100, the decode replica had a prompt's KV ~440 ms (p50)
    after the prefill replica sent it, about one receive per 15 ms while the prefill replica ran
    and one per millisecond once it was idle (docs/benchmarks.md, run 148); 128 ms with the
    mappings lingering (run 149).

    What it risks: CUDA leaves undefined what happens when a process frees an allocation that
    another process still maps. torch frees a cached segment only on `torch.cuda.empty_cache()`
    or when an allocation fails for lack of memory; a mapping nobody uses is never read again (a
    new payload comes with its own handle: CUDA gives each allocation a new one), and it goes
    after `linger_s`; a map that CUDA refuses is tried again once the unused mappings are gone.
    UCX's cuda_ipc transport keeps its mappings open the same way (its `UCX_CUDA_IPC_CACHE`, on
    by default)."""

    LINGER_S = 10.0

    def __init__(self, runtime: CudaRuntime | None = None, linger_s: float = LINGER_S,
                 clock: Callable[[], float] = time.monotonic, sweep_thread: bool = True) -> None:
        self._runtime = runtime
        self.linger_s = linger_s
        self.clock = clock
        self._changed = threading.Condition()
        self._open: dict[bytes, _Mapping] = {}
        # False: the owner calls `sweep` itself (tests, with a clock of their own)
        self._sweep_thread = sweep_thread
        self.maps = self.unmaps = 0  # running totals, for /metrics
        # Time the sweeps spent unmapping (by `clock`): an unmap waits for the GPU, and may hold
        # back the process's other CUDA calls meanwhile (its engine's next step among them).
        self.unmap_seconds = 0.0

    @property
    def runtime(self) -> CudaRuntime:
        return self._runtime or cuda_runtime()

    def acquire(self, handle: bytes, device: int) -> int:
        """The base pointer of the allocation behind `handle`, mapped on `device` (the caller's
        current device) if it is not mapped yet."""
        with self._changed:
            while (m := self._open.get(handle)) is not None and m.base is None:
                self._changed.wait()  # another thread maps or unmaps it
            if m is not None:
                m.users, m.idle_since = m.users + 1, None
                return m.base
            m = self._open[handle] = _Mapping(device)
            if self._sweep_thread:  # started with the first mapping
                self._sweep_thread = False
                threading.Thread(target=self._sweep_forever, daemon=True,
                                 name="cuda-ipc-unmap").start()
        try:
            try:
                base = self.runtime.open_mem(handle)
            except RuntimeError:
                # A sender that freed a segment may have one at the same address now, which
                # CUDA may refuse to map beside the old one's lingering mapping: unmap the
                # unused ones and try once more.
                if not self.sweep(idle_for=0.0):
                    raise
                self.runtime.set_device(device)  # the sweep's unmaps set theirs
                base = self.runtime.open_mem(handle)
        except BaseException:
            with self._changed:
                del self._open[handle]
                self._changed.notify_all()
            raise
        with self._changed:
            m.base, m.users = base, 1
            self.maps += 1
            self._changed.notify_all()
        return base

    def release(self, handle: bytes) -> None:
        """One user of `handle`'s mapping is done with it."""
        with self._changed:
            m = self._open[handle]
            m.users -= 1
            if m.users == 0:
                m.idle_since = self.clock()

    def sweep(self, idle_for: float | None = None) -> int:
        """Unmap every mapping that nobody has used for `idle_for` seconds (default:
        `linger_s`); returns how many."""
        now, idle_for = self.clock(), self.linger_s if idle_for is None else idle_for
        with self._changed:
            stale = [(handle, m) for handle, m in self._open.items()
                     if m.users == 0 and m.base is not None and m.idle_since is not None
                     and now - m.idle_since >= idle_for]
            bases = [m.base for _, m in stale]
            for _, m in stale:
                m.base = None  # acquires of these wait for the unmap
        start = self.clock()
        try:
            for (_, m), base in zip(stale, bases, strict=True):
                try:
                    self.runtime.set_device(m.device)
                    self.runtime.close_mem(base)
                except RuntimeError as e:  # left mapped: nothing reads it again
                    log.warning("unmapping a cuda_ipc sender's allocation failed: %s", e)
        finally:
            with self._changed:
                for handle, _ in stale:
                    del self._open[handle]
                self.unmaps += len(stale)
                if stale:
                    self.unmap_seconds += self.clock() - start
                self._changed.notify_all()
        return len(stale)

    def __len__(self) -> int:
        """How many allocations are mapped now, used or not."""
        with self._changed:
            return len(self._open)

    def in_use(self) -> int:
        """How many mappings some receive is using now."""
        with self._changed:
            return sum(m.users > 0 for m in self._open.values())

    def _sweep_forever(self) -> None:
        while True:
            time.sleep(self.linger_s / 2)
            self.sweep()


# CUDA maps a handle once per process, so every receiver in the process shares one table.
PROCESS_MAPPINGS = IpcMappings()
