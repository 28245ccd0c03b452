"""token_path: socket (serving/token_socket.py): a serving replica's per-step frames reach the
ingress's request queues in order; a connection without the reader's secret is dropped before
anything is read from it; a sink whose ingress went away aborts the requests open on it, and is
forgotten."""

from __future__ import annotations

import asyncio
import pickle
import socket
import threading

import pytest

from engine.metrics import Metrics
from engine.outputs import RequestOutput
from serving.sink_set import SinkSet
from serving.token_socket import FRAME, SECRET_BYTES, SocketReader, SocketSink, TokenSocket
from tests.e2e.serve_apps import wait_until


def _out(rid: str, token: int, finished: bool = False) -> RequestOutput:
    return RequestOutput(rid, [token], "", finished, "length" if finished else None)


@pytest.mark.anyio
async def test_frames_reach_each_requests_queue_in_order():
    reader = SocketReader(host="127.0.0.1")
    qa, qb = reader.open("a"), reader.open("b")
    lost: list[list[str]] = []
    sink = await asyncio.to_thread(SocketSink, reader.mailbox, Metrics("decode", "r"),
                                   lost.append)
    try:
        for rid in ("a", "b"):
            sink.open(rid, 0.0)
        for step in range(3):  # one frame per step, both requests in it
            sink.put(_out("a", 10 + step, finished=step == 2))
            sink.put(_out("b", 20 + step))
            await asyncio.to_thread(sink.flush)
        got_a = [await asyncio.wait_for(qa.get(), 10) for _ in range(3)]
        got_b = [await asyncio.wait_for(qb.get(), 10) for _ in range(3)]
        assert [o.new_token_ids for o in got_a] == [[10], [11], [12]]
        assert [o.finished for o in got_a] == [False, False, True]
        assert [o.new_token_ids for o in got_b] == [[20], [21], [22]]
        assert reader.num_connections == 1 and lost == [] and not sink.lost
    finally:
        sink._sock.close()
        reader.shutdown()


@pytest.mark.anyio
async def test_a_connection_without_the_secret_is_dropped_unread():
    reader = SocketReader(host="127.0.0.1")
    queue = reader.open("a")
    addr = reader.mailbox
    blob = b"\x80not a pickle"

    def intrude() -> bytes:
        with socket.create_connection((addr.host, addr.port), 10) as s:
            s.settimeout(10)
            s.sendall(b"x" * SECRET_BYTES + FRAME.pack(len(blob)) + blob)
            return s.recv(1)  # b"": the reader closed the connection

    try:
        assert await asyncio.to_thread(intrude) == b""
        assert queue.empty() and reader.num_connections == 0
    finally:
        reader.shutdown()


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        assert chunk, "the sink closed the connection"
        buf += chunk
    return bytes(buf)


def _connected_sink(**kwargs) -> tuple[SocketSink, socket.socket, list[list[str]]]:
    listener = socket.create_server(("127.0.0.1", 0))
    address = TokenSocket("slow", "127.0.0.1", listener.getsockname()[1], b"s" * SECRET_BYTES)
    lost: list[list[str]] = []
    sink = SocketSink(address, Metrics("decode", "r"), lost.append, **kwargs)
    peer, _ = listener.accept()
    listener.close()
    assert _recv_exactly(peer, SECRET_BYTES) == address.secret
    sink.open("a", 0.0)
    return sink, peer, lost


def _flush_until(sink: SocketSink, done, big: int = 20_000) -> int:
    """Flushes frames of `big` tokens each until `done()`, in a thread, so that a flush that
    blocked would fail the test instead of hanging it; returns the number of frames."""
    count = [0]

    def run() -> None:
        while not done() and count[0] < 100_000:
            sink.put(RequestOutput("a", list(range(count[0], count[0] + big)), "", False))
            sink.flush()
            count[0] += 1

    t = threading.Thread(target=run)
    t.start()
    t.join(120)
    assert not t.is_alive(), "a flush blocked on the slow ingress"
    return count[0]


def test_a_slow_ingress_gets_every_frame_in_order_and_never_blocks_a_flush():
    sink, peer, lost = _connected_sink()
    try:
        # The peer reads nothing: the kernel's buffers fill, then the sink's backlog.
        n = _flush_until(sink, lambda: sink.backlog_bytes > 0)
        for k in range(5):  # these join the backlog behind the frames already in it
            sink.put(RequestOutput("a", [-1, k], "", k == 4, "length" if k == 4 else None))
            sink.flush()
        frames = []
        for _ in range(n + 5):  # now the ingress reads: everything arrives, in order
            (size,) = FRAME.unpack(_recv_exactly(peer, FRAME.size))
            frames += [RequestOutput.from_wire(t) for t in pickle.loads(_recv_exactly(peer, size))]
        assert [o.new_token_ids[0] for o in frames[:n]] == list(range(n))
        assert [o.new_token_ids for o in frames[n:]] == [[-1, k] for k in range(5)]
        assert frames[-1].finished and not sink.lost and lost == []
    finally:
        sink._sock.close()
        peer.close()


def test_an_ingress_that_leaves_too_much_unread_loses_the_sink():
    sink, peer, lost = _connected_sink(max_backlog_bytes=1 << 20)
    try:
        _flush_until(sink, lambda: sink.lost)
        assert lost == [["a"]] and sink.backlog_bytes == 0
    finally:
        peer.close()


def test_a_sink_whose_ingress_went_away_aborts_its_open_requests():
    sink, peer, lost = _connected_sink()
    peer.close()  # the ingress replica died
    sink.open("b", 0.0)
    for step in range(100):  # the first writes may still land in the socket's buffer
        sink.put(_out("a", step))
        sink.flush()
        if sink.lost:
            break
    assert sink.lost and lost == [["a", "b"]]
    sink.put(_out("a", 1))
    sink.flush()  # a lost sink sends nothing and reports nothing more
    assert lost == [["a", "b"]]


def test_a_sink_that_reads_aborts_is_lost_when_its_ingress_closes_the_connection():
    """No write has to notice: a prefill replica's sink for a decode replica carries only that
    replica's aborts, and writes nothing."""
    loop = asyncio.new_event_loop()
    try:
        sink, peer, lost = _connected_sink(on_abort=lambda rid: None, loop=loop)
        peer.close()  # the decode replica died
        wait_until("the sink lost", lambda: sink.lost, limit_s=30)
        assert lost == [["a"]] and sink._sock.fileno() == -1
    finally:
        loop.close()


@pytest.mark.anyio
async def test_a_lost_sink_is_forgotten_at_the_next_get():
    listeners = [socket.create_server(("127.0.0.1", 0)) for _ in range(2)]
    addresses = [TokenSocket(f"i{k}", "127.0.0.1", s.getsockname()[1], b"s" * SECRET_BYTES)
                 for k, s in enumerate(listeners)]
    sinks = SinkSet(Metrics("prefill", "r"), on_lost=lambda ids: None, on_abort=lambda rid: None)
    try:
        gone = await sinks.get(addresses[0])
        peer, _ = listeners[0].accept()
        peer.close()  # its replica died, and never sends a request again
        await asyncio.to_thread(wait_until, "the sink lost", lambda: gone.lost, 30)
        stays = await sinks.get(addresses[1])
        assert sinks.sinks == {"i1": stays}
        stays._sock.close()
    finally:
        for listener in listeners:
            listener.close()


@pytest.mark.anyio
async def test_requests_arriving_during_a_connect_share_one_connection():
    listener = socket.create_server(("127.0.0.1", 0))
    address = TokenSocket("i1", "127.0.0.1", listener.getsockname()[1], b"s" * SECRET_BYTES)
    sinks = SinkSet(Metrics("decode", "r"), on_lost=lambda ids: None)
    got = await asyncio.gather(*(sinks.get(address) for _ in range(3)))
    try:
        assert isinstance(got[0], SocketSink) and got[1] is got[0] and got[2] is got[0]
        assert await sinks.get(address) is got[0]
        listener.settimeout(5)
        conn, _ = listener.accept()  # the one connection, sending the secret first
        assert conn.recv(SECRET_BYTES) == b"s" * SECRET_BYTES
        listener.settimeout(0.2)
        with pytest.raises(TimeoutError):
            listener.accept()  # and no other
        conn.close()
    finally:
        got[0]._sock.close()
        listener.close()


@pytest.mark.anyio
async def test_a_failed_connect_fails_its_requests_and_the_next_one_tries_again():
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()  # nobody listens there now: the connect is refused
    address = TokenSocket("i1", "127.0.0.1", port, b"s" * SECRET_BYTES)
    sinks = SinkSet(Metrics("decode", "r"), on_lost=lambda ids: None)
    results = await asyncio.gather(sinks.get(address), sinks.get(address),
                                   return_exceptions=True)
    assert all(isinstance(r, ConnectionRefusedError) for r in results)
    assert sinks.sinks == {}
    listener = socket.create_server(("127.0.0.1", port))  # the ingress is back
    try:
        sink = await sinks.get(address)
        assert isinstance(sink, SocketSink) and sinks.sinks == {"i1": sink}
        sink._sock.close()
    finally:
        listener.close()


@pytest.mark.anyio
async def test_the_next_request_serves_the_socket_again_if_its_server_ended():
    reader = SocketReader(host="127.0.0.1")
    reader.open("a")
    first = reader._task
    first.cancel()  # as if the server task had died
    with pytest.raises(asyncio.CancelledError):
        await first
    qb = reader.open("b")
    assert reader._task is not first
    sink = await asyncio.to_thread(SocketSink, reader.mailbox, Metrics("decode", "r"),
                                   lambda ids: None)
    try:
        sink.open("b", 0.0)
        sink.put(_out("b", 5))
        await asyncio.to_thread(sink.flush)
        assert (await asyncio.wait_for(qb.get(), 10)).new_token_ids == [5]
    finally:
        sink._sock.close()
        second = reader._task
        reader.shutdown()
    reader.open("c")  # after shutdown nothing is served again
    assert reader._task is second
