"""The token path over TCP (`token_path: socket`): each serving replica keeps one connection to
each ingress replica it serves and writes one frame per engine step into it, carrying every
output of that step for that ingress's streams; the ingress reads frames on its event loop and
fans them out (the same `Fanout` as the mailbox path).

Against the mailbox path (serving/token_mailbox.py) this takes the token mailbox actor and two
Ray calls per step out of the way: a frame is one non-blocking `send` on the serving replica's
step thread and one read on the ingress's loop. TCP keeps a
connection's frames in order, so nothing is numbered or held back. The per-request Serve call
stays, as with the mailbox, for routing, cancellation, errors and failover.

Frames: a 4-byte big-endian length, then the step's outputs pickled as `RequestOutput.to_wire`
tuples. A connection starts with the reader's secret (32 random bytes that only travel inside
Ray calls, in the `TokenSocket` address); the reader drops a connection that does not, before it
unpickles anything from it.

Aborts travel the other way on the same connection (`SocketReader.abort`): a frame per request
id, its UTF-8 bytes, read on the serving replica by a thread per connection that hands each id to
`on_abort` on the replica's event loop. They are for requests sent many to a Serve call
(serving/batched_submit.py), which one call's cancellation cannot abort alone. (A decode
replica's own reader carries only such aborts, to the prefill replicas it sends prompts to.) An
id that the replica does not run is ignored there; the reader sends every connection each abort
(a reader has few), and a connection that joins later the most recent ones, so an abort never
misses the replica that runs the request.

Failure: if a write fails, the ingress reads nothing for SEND_TIMEOUT_S, it leaves more than
MAX_BACKLOG_BYTES unread (the ingress died or stopped reading), or, where the sink reads aborts,
the ingress closes the connection, the sink is lost:
`on_lost(request_ids)` aborts the requests still open on it, as the mailbox sink does; the next
request from that ingress opens a new connection. A slow ingress never stalls the step thread
(see `SocketSink`). A serving replica that dies ends its requests' Serve calls with an error,
which the ingress handles as before (failover, api/handle_client.py).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import select
import socket
import struct
import threading
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from engine.metrics import Metrics
from serving.step_sink import StepSink
from serving.token_fanout import TokenReader

log = logging.getLogger(__name__)

FRAME = struct.Struct("!I")  # the length of the pickled batch that follows
SECRET_BYTES = 32
CONNECT_TIMEOUT_S = 10.0
SEND_TIMEOUT_S = 30.0  # the ingress read nothing for this long: it is gone or stuck
# Bytes a sink keeps for an ingress that reads slower than the steps come (beyond the kernel's
# buffers): ~10^4 steps of 128 streams' tokens. Past it the ingress counts as gone.
MAX_BACKLOG_BYTES = 64 << 20
RECENT_ABORTS = 1024  # aborts a connection that joins later is sent (see the top)


@dataclass(frozen=True)
class TokenSocket:
    """The address a request carries (in place of a `Mailbox`): where its outputs go."""

    id: str
    host: str
    port: int
    secret: bytes = field(repr=False)


def node_ip() -> str:
    """This node's address as Ray knows it (reachable from the other nodes), else loopback."""
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - no Ray (tests): this host only
        return "127.0.0.1"


class SocketReader(TokenReader):
    """The ingress side: a listening socket whose frames feed the open requests' queues.

    The socket is bound and listening from construction (connections wait in the backlog); it
    is served from the first `open` on (serving/token_fanout.py)."""

    def __init__(self, host: str | None = None) -> None:
        super().__init__()
        host = host or node_ip()
        self._listener = socket.create_server((host, 0))
        self._listener.setblocking(False)
        self.mailbox = TokenSocket(uuid.uuid4().hex, host, self._listener.getsockname()[1],
                                   os.urandom(SECRET_BYTES))
        self.num_connections = 0
        self._writers: set[asyncio.StreamWriter] = set()
        self._recent_aborts: deque[bytes] = deque(maxlen=RECENT_ABORTS)

    def abort(self, request_ids: Iterable[str]) -> None:
        """Ask every serving replica connected here to abort `request_ids` (see the top)."""
        frames = [_id_frame(rid) for rid in request_ids]
        self._recent_aborts.extend(frames)
        for writer in self._writers:
            writer.write(b"".join(frames))

    async def _receive(self) -> None:
        server = await asyncio.start_server(self._connection, sock=self._listener)
        async with server:
            await server.serve_forever()

    async def _connection(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        try:
            secret = await reader.readexactly(SECRET_BYTES)
            if not hmac.compare_digest(secret, self.mailbox.secret):
                log.warning("token socket: a connection without the secret was dropped")
                return
            self.num_connections += 1
            writer.write(b"".join(self._recent_aborts))
            self._writers.add(writer)
            while True:
                (size,) = FRAME.unpack(await reader.readexactly(FRAME.size))
                self.fanout.deliver_batch(await reader.readexactly(size))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the serving replica closed or died: its calls end on their own (see top)
        finally:
            self._writers.discard(writer)
            writer.close()

    def shutdown(self) -> None:
        self._closed = True
        for writer in list(self._writers):  # the serving replicas see this reader go
            try:
                writer.close()
            except RuntimeError:  # its loop is closed: the process is going away
                pass
        if self._task is None or self._task.done():
            self._listener.close()
            return
        self._task.cancel()
        # Once the server has stopped serving it: closed before, its fd is gone when the
        # cancelled task unregisters it.
        self._task.add_done_callback(lambda _: self._listener.close())


class SocketSink(StepSink):
    """The serving replica's side for one ingress replica: one frame per step
    (serving/step_sink.py). Connects on construction (blocking, at most CONNECT_TIMEOUT_S).

    The step thread never waits on the ingress: it writes a frame with a non-blocking send, and
    what the kernel does not take (the ingress is slow to read and the socket's buffers are
    full) goes to a backlog that a writer thread, started then, drains in order. While the
    backlog is not empty every frame joins it. A backlog past `max_backlog_bytes`, a write that
    fails, or one that cannot proceed for SEND_TIMEOUT_S loses the sink.

    With `on_abort`, a thread reads the aborts the ingress sends and calls `on_abort(id)` for
    each, on the event loop `loop`."""

    def __init__(self, address: TokenSocket, metrics: Metrics,
                 on_lost: Callable[[list[str]], None],
                 max_backlog_bytes: int = MAX_BACKLOG_BYTES,
                 on_abort: Callable[[str], None] | None = None,
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(metrics, on_lost)
        self.address, self.max_backlog_bytes = address, max_backlog_bytes
        self._sock = socket.create_connection((address.host, address.port), CONNECT_TIMEOUT_S)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # a frame per step
        self._sock.sendall(address.secret)
        self._sock.setblocking(False)
        self._backlog: deque[memoryview] = deque()  # bytes the kernel has not taken, in order
        self.backlog_bytes = 0
        self._cond = threading.Condition()
        self._writer: threading.Thread | None = None
        if on_abort is not None and loop is not None:
            threading.Thread(target=self._read_aborts, args=(on_abort, loop), daemon=True,
                             name=f"token-socket-aborts-{address.id[:8]}").start()

    def _read_aborts(self, on_abort: Callable[[str], None],
                     loop: asyncio.AbstractEventLoop) -> None:
        """(Abort reader thread.) Until the connection ends or the sink is lost."""
        buf = b""
        while not self.lost:
            try:
                readable, _, _ = select.select([self._sock], [], [], 1.0)
                if not readable:
                    continue
                chunk = self._sock.recv(1 << 16)
            except BlockingIOError:
                continue
            except (OSError, ValueError) as e:  # ValueError: closed by `_fail` meanwhile
                with self._cond:
                    self._fail(e)
                return
            if not chunk:
                # The ingress closed the connection: it died or shut down. Lost now, not at the
                # next write, which may never come (a sink that carries only aborts: a decode
                # replica's prefill calls).
                with self._cond:
                    self._fail(ConnectionError("the ingress closed the connection"))
                return
            buf += chunk
            while len(buf) >= FRAME.size:
                (size,) = FRAME.unpack_from(buf)
                if len(buf) < FRAME.size + size:
                    break
                request_id = buf[FRAME.size:FRAME.size + size].decode()
                buf = buf[FRAME.size + size:]
                try:
                    loop.call_soon_threadsafe(on_abort, request_id)
                except RuntimeError:  # the loop is closed: the replica is going away
                    return

    def send(self, blob: bytes) -> None:
        frame = memoryview(FRAME.pack(len(blob)) + blob)
        with self._cond:
            if self.lost:
                return
            if not self._backlog:  # nothing queued before it: try the socket now
                try:
                    frame = frame[self._sock.send(frame):]
                except BlockingIOError:
                    pass
                except OSError as e:
                    self._fail(e)
                    return
                if not frame:
                    return
            if self.backlog_bytes + len(frame) > self.max_backlog_bytes:
                self._fail(OSError(f"the ingress left {self.backlog_bytes} bytes unread"))
                return
            self._backlog.append(frame)
            self.backlog_bytes += len(frame)
            if self._writer is None:
                self._writer = threading.Thread(target=self._drain, daemon=True,
                                                name=f"token-socket-{self.address.id[:8]}")
                self._writer.start()
            self._cond.notify()

    def _drain(self) -> None:
        """(Writer thread.) Sends the backlog's head whenever the socket can take more; the
        only sender while the backlog is not empty."""
        while True:
            with self._cond:
                while not self._backlog and not self.lost:
                    self._cond.wait()
                if self.lost:
                    return
                head = self._backlog[0]
            try:
                _, writable, _ = select.select([], [self._sock], [], SEND_TIMEOUT_S)
                if not writable:
                    raise TimeoutError(f"the ingress read nothing for {SEND_TIMEOUT_S:.0f} s")
                sent = self._sock.send(head)
            except BlockingIOError:
                continue
            except (OSError, ValueError) as e:  # ValueError: the socket was closed meanwhile
                with self._cond:
                    self._fail(e)
                return
            with self._cond:
                self.backlog_bytes -= sent
                if sent == len(head):
                    self._backlog.popleft()
                else:
                    self._backlog[0] = head[sent:]

    def _fail(self, e: BaseException) -> None:
        """(Under `_cond`.) Close the connection and abort the requests open on it."""
        if self.lost:
            return
        self._sock.close()
        self._backlog.clear()
        self.backlog_bytes = 0
        log.warning("token socket %s lost (%r); aborting its %d requests",
                    self.address.id[:8], e, len(self.recorders))
        self.mark_lost()
        self._cond.notify()


def _id_frame(request_id: str) -> bytes:
    data = request_id.encode()
    return FRAME.pack(len(data)) + data
