"""Starting a server under test as a subprocess, waiting for it to be healthy, stopping it.

The default commands are Ray Serve's: `serve run CONFIG` in the foreground, then on stop an
interrupt (serve run shuts its apps down on Ctrl-C), `serve shutdown -y` and `ray stop` for
whatever a cluster kept running, and a kill of the process group as the last resort.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

DEFAULT_LAUNCH = "{serve} run {config}"
DEFAULT_STOP = ("{serve} shutdown -y", "{ray} stop")


def _tool(name: str) -> str:
    """A console script of this interpreter's environment, else whatever PATH has."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else (shutil.which(name) or name)


def expand(template: str, config: str = "") -> list[str]:
    """Split a command template and fill {config}, {python}, {serve}, {ray}."""
    subs = {"config": config, "python": sys.executable, "serve": _tool("serve"),
            "ray": _tool("ray")}
    return [part.format(**subs) for part in shlex.split(template)]


def haproxy_threads(cpus: int | None = None) -> int:
    """Threads for Serve's HAProxy on a machine of `cpus` cores: half of them, 1 to 4. Ray's
    default is 4 on any machine; on two cores one thread answered a burst's 429s faster, p50
    56 against 76 ms, p99 142 against 187 ms (medians of 5-6 runs each, with no change in
    throughput: docs/cpu-benchmarks.md, "HAProxy's threads")."""
    cpus = cpus or os.cpu_count() or 1
    return min(4, max(1, cpus // 2))


def serve_env() -> dict[str, str]:
    """The environment `make serve` starts Ray with (Serve's controller reads it at start):
    the HAProxy ingress (cluster/app.py) and its thread count. The Makefile spells the same."""
    return {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_HAPROXY_NBTHREAD": str(haproxy_threads())}


def haproxy_admin_socket(since: float) -> Path | None:
    """The newest of Serve's HAProxy admin sockets (one folder per node under the folder of
    `RAY_SERVE_HAPROXY_SOCKET_PATH`) made at or after `since` (a time.time()); None if none."""
    base = Path(os.environ.get("RAY_SERVE_HAPROXY_SOCKET_PATH",
                               "/tmp/haproxy-serve/admin.sock")).parent
    found = []
    for path in base.glob("*/admin.sock"):
        try:
            mtime = path.stat().st_mtime
        except OSError:
            continue  # removed meanwhile
        if mtime >= since:
            found.append((mtime, path))
    return max(found)[1] if found else None


def haproxy_command(sock: Path, command: str, timeout: float = 2.0) -> str:
    """One command on an HAProxy admin socket; its whole answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(sock))
        s.sendall(command.encode() + b"\n")
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


def routes_to_replica(servers_state: str) -> bool:
    """True when `show servers state` lists a Serve replica as an UP server (operational state
    2) of an HTTP backend: HAProxy then sends requests to the ingress replica itself. Until then
    they go to its fallback server, Serve's Python proxy, which forwards them over a handle."""
    for line in servers_state.splitlines():
        f = line.split()  # be_id be_name srv_id srv_name srv_addr srv_op_state ...
        if (len(f) > 5 and not line.startswith("#") and f[1].startswith("http-")
                and f[3].startswith("SERVE_REPLICA") and f[5] == "2"):
            return True
    return False


class ServerProcess:
    def __init__(
        self,
        launch: Sequence[str],
        health_url: str,
        log_path: Path,
        stop_cmds: Sequence[Sequence[str]] = (),
    ) -> None:
        self.launch = list(launch)
        self.health_url = health_url
        self.log_path = log_path
        self.stop_cmds = [list(c) for c in stop_cmds]
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0  # time.time() at start

    def start(self) -> None:
        if self.healthy():
            # A server left running (by an earlier run, or by hand) would answer every request
            # and the figures would be its config's, not this one's.
            raise RuntimeError(f"{self.health_url} answers before this server has started: "
                               "stop what serves there first (serve shutdown -y; ray stop)")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"$ {shlex.join(self.launch)}\n".encode())
            log.flush()
            # A session of its own, so stop() can signal serve run and everything it spawned.
            # Serve's HAProxy ingress as `make serve` runs it, unless the caller's environment
            # says otherwise (other systems ignore the variables).
            env = {**serve_env(), **os.environ}
            self.started_at = time.time()
            self.proc = subprocess.Popen(
                self.launch, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, env=env,
            )

    def healthy(self) -> bool:
        """The health URL answers 200 now."""
        try:
            with urllib.request.urlopen(self.health_url, timeout=2.0) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False  # not listening, or unhealthy (HTTPError is a URLError)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, timeout: float = 300.0, interval: float = 0.5,
                   route_timeout: float = 30.0) -> float:
        """Poll the health URL until it answers 200; returns seconds waited until then. Fails
        fast if the process exits, with the tail of its log in the message.

        Behind Serve's HAProxy (an admin socket made since `start`) it then waits, at most
        `route_timeout` s more, until HAProxy routes to an ingress replica itself. The first
        200 can come through HAProxy's fallback, Serve's Python proxy, up to ~1 s before the
        switch, and the switch restarts HAProxy: a benchmark that began at once measured that
        restart (a first burst of 429s at 148 ms against 14-33 ms for the next five,
        docs/cpu-benchmarks.md, "Serve's switch to direct ingress")."""
        t0 = time.monotonic()
        while True:
            if not self.alive():
                rc = None if self.proc is None else self.proc.returncode
                raise RuntimeError(f"server exited (rc={rc}) before ready:\n{self.log_tail()}")
            if self.healthy():
                break
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"{self.health_url} not healthy after {timeout:.0f} s:\n"
                                   f"{self.log_tail()}")
            time.sleep(interval)
        healthy_s = time.monotonic() - t0
        if not self.wait_routed(route_timeout):
            print(f"warning: Serve's HAProxy did not route to an ingress replica within "
                  f"{route_timeout:.0f} s of the first 200; figures may include its switch-over",
                  file=sys.stderr)
        return healthy_s

    def wait_routed(self, timeout: float, interval: float = 0.1) -> bool:
        """Wait until Serve's HAProxy, if this server started one, routes to an ingress replica
        (`routes_to_replica`). True at once where no HAProxy admin socket was made since
        `start` (another server, or Serve's own proxy only)."""
        deadline = time.monotonic() + timeout
        while True:
            sock = haproxy_admin_socket(self.started_at)
            if sock is None:
                return True
            try:
                if routes_to_replica(haproxy_command(sock, "show servers state")):
                    return True
            except OSError:
                pass  # between two HAProxy processes: ask again
            if time.monotonic() > deadline:
                return False
            time.sleep(interval)

    def stop(self, grace: float = 30.0) -> None:
        if self.alive():
            assert self.proc is not None
            # The leader only: Ray's own processes must outlive serve run's graceful shutdown.
            self.proc.send_signal(signal.SIGINT)
            self._wait(grace)
        with open(self.log_path, "ab") as log:
            for cmd in self.stop_cmds:
                log.write(f"$ {shlex.join(cmd)}\n".encode())
                log.flush()
                try:
                    subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, timeout=120, check=False)
                except (OSError, subprocess.TimeoutExpired) as e:
                    log.write(f"stop command failed: {e}\n".encode())
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if not self.alive():
                break
            self._signal(sig)
            self._wait(10.0)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def _signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def _wait(self, timeout: float) -> None:
        assert self.proc is not None
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
