"""IpcMappings: a sender's allocation is mapped once however many receives use it at a time,
and unmapped when the last of them lets go (CUDA maps a handle at most once per process)."""

from __future__ import annotations

import pytest

from kvtransfer.cuda_runtime import IPC_HANDLE_SIZE, IpcMappings, _handle


class RecordingRuntime:
    """Stands in for the CUDA runtime on a machine without a GPU: hands out base pointers and
    records which are open."""

    def __init__(self) -> None:
        self.open: dict[int, bytes] = {}
        self.calls: list[tuple[str, int]] = []
        self.next_ptr = 0x1000

    def open_mem(self, handle: bytes) -> int:
        assert handle not in self.open.values(), "mapped twice"
        ptr, self.next_ptr = self.next_ptr, self.next_ptr + 0x1000
        self.open[ptr] = handle
        self.calls.append(("open", ptr))
        return ptr

    def close_mem(self, ptr: int) -> None:
        del self.open[ptr]
        self.calls.append(("close", ptr))


A, B = b"a" * IPC_HANDLE_SIZE, b"b" * IPC_HANDLE_SIZE


def test_one_mapping_per_allocation_until_the_last_user_releases():
    rt = RecordingRuntime()
    maps = IpcMappings(rt)
    assert maps.acquire(A) == 0x1000
    assert maps.acquire(A) == 0x1000  # a second payload in the same allocation
    assert maps.acquire(B) == 0x2000
    assert len(maps) == 2
    maps.release(A)
    assert rt.open == {0x1000: A, 0x2000: B}  # one user of A left
    maps.release(A)
    maps.release(B)
    assert rt.calls == [("open", 0x1000), ("open", 0x2000), ("close", 0x1000),
                        ("close", 0x2000)]
    assert len(maps) == 0 and rt.open == {}
    assert maps.acquire(A) == 0x3000  # mapped afresh: the old mapping is gone


def test_a_failed_map_leaves_nothing_counted():
    class Failing(RecordingRuntime):
        def open_mem(self, handle: bytes) -> int:
            raise RuntimeError("cudaIpcOpenMemHandle: invalid argument")

    maps = IpcMappings(Failing())
    with pytest.raises(RuntimeError, match="cudaIpcOpenMemHandle"):
        maps.acquire(A)
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
