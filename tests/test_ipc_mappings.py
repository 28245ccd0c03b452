"""IpcMappings: a sender's allocation is mapped once however many receives use it at a time
(CUDA maps a handle at most once per process), stays mapped while its payloads keep coming,
and is unmapped once nobody has used it for `linger_s`."""

from __future__ import annotations

import threading

import pytest

from kvtransfer.cuda_runtime import IPC_HANDLE_SIZE, IpcMappings, _handle


class RecordingRuntime:
    """Stands in for the CUDA runtime on a machine without a GPU: hands out base pointers and
    records which are open, and on which device each unmap ran."""

    def __init__(self) -> None:
        self.open: dict[int, bytes] = {}
        self.calls: list[tuple[str, int]] = []
        self.next_ptr = 0x1000
        self.device = 0

    def open_mem(self, handle: bytes) -> int:
        assert handle not in self.open.values(), "mapped twice"
        ptr, self.next_ptr = self.next_ptr, self.next_ptr + 0x1000
        self.open[ptr] = handle
        self.calls.append(("open", ptr))
        return ptr

    def set_device(self, index: int) -> None:
        self.device = index

    def close_mem(self, ptr: int) -> None:
        del self.open[ptr]
        self.calls.append((f"close on {self.device}", ptr))


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


A, B = b"a" * IPC_HANDLE_SIZE, b"b" * IPC_HANDLE_SIZE


def mappings(rt: RecordingRuntime, clock: Clock) -> IpcMappings:
    return IpcMappings(rt, linger_s=10.0, clock=clock, sweep_thread=False)


def test_one_mapping_per_allocation_kept_for_the_next_payloads():
    rt, clock = RecordingRuntime(), Clock()
    maps = mappings(rt, clock)
    assert maps.acquire(A, 0) == 0x1000
    assert maps.acquire(A, 0) == 0x1000  # a second payload in the same allocation
    assert maps.acquire(B, 1) == 0x2000
    assert (len(maps), maps.in_use()) == (2, 2)
    for handle in (A, A, B):
        maps.release(handle)
    assert (len(maps), maps.in_use()) == (2, 0)
    clock.now = 9.9
    assert maps.acquire(A, 0) == 0x1000  # nothing unmapped, nothing mapped again
    assert rt.calls == [("open", 0x1000), ("open", 0x2000)]
    assert maps.sweep() == 0
    assert (maps.maps, maps.unmaps) == (2, 0)  # the totals /metrics reports


def test_a_mapping_unused_for_linger_s_is_unmapped_on_its_device():
    rt, clock = RecordingRuntime(), Clock()
    maps = mappings(rt, clock)
    maps.acquire(A, 0)
    maps.acquire(B, 1)
    clock.now = 5.0
    maps.release(B)  # unused from 5.0 on; A stays in use
    clock.now = 14.9
    assert maps.sweep() == 0
    clock.now = 15.0
    assert maps.sweep() == 1
    assert rt.calls[-1] == ("close on 1", 0x2000)
    assert rt.open == {0x1000: A} and len(maps) == 1
    assert maps.acquire(B, 1) == 0x3000  # mapped afresh
    clock.now = 100.0
    maps.release(A)
    maps.release(B)
    clock.now = 110.0
    assert maps.sweep() == 2 and len(maps) == 0 and rt.open == {}
    assert (maps.maps, maps.unmaps) == (3, 3)


def test_a_receive_during_the_unmap_waits_for_it_then_maps_afresh():
    unmapping, finish = threading.Event(), threading.Event()

    class SlowUnmap(RecordingRuntime):
        def close_mem(self, ptr: int) -> None:
            unmapping.set()
            assert finish.wait(5)
            super().close_mem(ptr)

    rt, clock = SlowUnmap(), Clock()
    maps = mappings(rt, clock)
    maps.acquire(A, 0)
    maps.release(A)
    clock.now = 10.0
    sweeper = threading.Thread(target=maps.sweep)
    sweeper.start()
    assert unmapping.wait(5)
    got: list[int] = []
    receiver = threading.Thread(target=lambda: got.append(maps.acquire(A, 0)))
    receiver.start()
    receiver.join(0.2)
    assert got == []  # waits: CUDA maps a handle once per process
    finish.set()
    sweeper.join(5)
    receiver.join(5)
    assert got == [0x2000]
    assert rt.calls == [("open", 0x1000), ("close on 0", 0x1000), ("open", 0x2000)]


def test_a_refused_map_unmaps_the_unused_mappings_and_tries_again():
    """A sender that freed a segment and has a new one at its address: CUDA may refuse the new
    handle while the old one's mapping lingers."""
    class RefusedBesideA(RecordingRuntime):
        def open_mem(self, handle: bytes) -> int:
            if handle == B and A in self.open.values():
                raise RuntimeError("cudaIpcOpenMemHandle: already mapped")
            return super().open_mem(handle)

    rt, clock = RefusedBesideA(), Clock()
    maps = mappings(rt, clock)
    maps.acquire(A, 0)
    maps.release(A)  # unused, within its linger_s
    assert maps.acquire(B, 0) == 0x2000
    assert rt.calls == [("open", 0x1000), ("close on 0", 0x1000), ("open", 0x2000)]

    rt = RefusedBesideA()
    maps = mappings(rt, clock)
    maps.acquire(A, 0)  # in use: nothing to unmap, so the refusal stands
    with pytest.raises(RuntimeError, match="already mapped"):
        maps.acquire(B, 0)
    assert (len(maps), maps.in_use()) == (1, 1) and rt.calls == [("open", 0x1000)]


def test_a_failed_map_leaves_nothing_counted():
    class Failing(RecordingRuntime):
        def open_mem(self, handle: bytes) -> int:
            raise RuntimeError("cudaIpcOpenMemHandle: invalid argument")

    maps = mappings(Failing(), Clock())
    with pytest.raises(RuntimeError, match="cudaIpcOpenMemHandle"):
        maps.acquire(A, 0)
    assert len(maps) == 0


def test_handles_have_cudas_size():
    assert bytes(_handle(A)) == A
    with pytest.raises(ValueError, match="64 bytes, not 3"):
        _handle(b"abc")


def test_the_sender_sends_the_cuda_malloc_handle_inside_torchs():
    from kvtransfer.cuda_ipc import cuda_malloc_handle

    raw = bytes(range(IPC_HANDLE_SIZE))
    assert cuda_malloc_handle(b"\x01c" + raw) == raw  # version 1, a cudaMalloc'd segment
    with pytest.raises(ValueError, match="expandable segment"):
        cuda_malloc_handle(b"\x01e" + raw + b"more")


def test_the_sweeps_time_their_unmaps():
    """An unmap waits for the GPU: /metrics has the time the sweeps spent in them."""
    rt, clock = RecordingRuntime(), Clock()
    maps = mappings(rt, clock)
    close = rt.close_mem

    def slow_close(ptr: int) -> None:  # each unmap takes 0.25 s of the clock
        close(ptr)
        clock.now += 0.25

    rt.close_mem = slow_close
    for handle in (A, B):
        maps.acquire(handle, 0)
        maps.release(handle)
    assert maps.sweep() == 0 and maps.unmap_seconds == 0.0  # a sweep with nothing to unmap
    clock.now = 10.0
    assert maps.sweep() == 2
    assert maps.unmap_seconds == 0.5
