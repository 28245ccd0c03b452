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
import threading
from functools import cache

import torch

IPC_HANDLE_SIZE = 64  # bytes of cudaIpcMemHandle_t and of cudaIpcEventHandle_t
_LAZY_ENABLE_PEER_ACCESS = 1  # cudaIpcMemLazyEnablePeerAccess
_DEVICE_TO_DEVICE = 3  # cudaMemcpyDeviceToDevice
_MAX_PITCH = 11  # cudaDevAttrMaxPitch: the largest pitch cudaMemcpy2D* take


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


class IpcMappings:
    """Another process's allocations mapped into this one, each at most once at a time (CUDA
    maps a handle once per process): `acquire` maps on first use and counts users, `release`
    unmaps when the last one lets go. Thread-safe; the map and unmap calls hold no GIL."""

    def __init__(self, runtime: CudaRuntime | None = None) -> None:
        self._runtime = runtime
        self._lock = threading.Lock()
        self._open: dict[bytes, list[int]] = {}  # handle -> [base pointer, users]

    @property
    def runtime(self) -> CudaRuntime:
        return self._runtime or cuda_runtime()

    def acquire(self, handle: bytes) -> int:
        """The base pointer of the allocation behind `handle` (mapped in the caller's current
        device's context)."""
        with self._lock:
            entry = self._open.get(handle)
            if entry is None:
                entry = self._open[handle] = [self.runtime.open_mem(handle), 0]
            entry[1] += 1
            return entry[0]

    def release(self, handle: bytes) -> None:
        with self._lock:
            entry = self._open[handle]
            entry[1] -= 1
            if entry[1] == 0:
                del self._open[handle]
                self.runtime.close_mem(entry[0])

    def __len__(self) -> int:
        """How many allocations are mapped now."""
        with self._lock:
            return len(self._open)


# CUDA maps a handle once per process, so every receiver in the process shares one table.
PROCESS_MAPPINGS = IpcMappings()
