"""A device farm on TVM RPC: a tracker and servers keyed by device kind, started, listed and stopped.

``tvm-lut farm start --x86 3 --arm 1`` starts one ``tvm.exec.rpc_tracker`` and the servers
(``tvm.exec.rpc_server --key x86`` on this host's Python, ``--key arm64`` on the emulated aarch64 Python of
``tvm-lut farm setup-arm``), each in its own process group, so that ``stop`` (or a test killing one
server) takes its worker processes down with it: killing only the ``rpc_tracker`` parent would orphan its
listening worker (cookbook §5). The farm's state (addresses, pids, logs) lives in a directory
(``$TVM_LUT_FARM_DIR`` or ``~/.cache/tvm-lut/farm``), which ``status`` and ``stop`` read.

Ports are picked free and passed as one-port ranges: a busy port is an error, never a silent move to
the next one (where servers could register with someone else's tracker).

Security: TVM RPC has no authentication; anyone who reaches a server can run code on it. The farm binds
to 127.0.0.1 unless ``--host`` names another address *and* ``--allow-remote`` is given.

Remote runs: ``artifact.run_remote`` uploads an artifact's ``model.so`` to a server of the key and runs it in the
remote ``relax.VirtualMachine``: how an ARM build is checked against x86 (``tvm-lut run --farm``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

from tvm_lut.errors import OptionError, TargetError

LOOPBACK = ("127.0.0.1", "localhost", "::1")
NO_AUTH_WARNING = ("WARNING: TVM RPC has no authentication: anyone who can reach {host} can run code on this "
                   "machine through the farm. Bind to 127.0.0.1 unless the network is trusted.")
KEYS = ("x86", "arm64")


def farm_dir() -> str:
    return os.environ.get("TVM_LUT_FARM_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "tvm-lut", "farm")


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` -> (host, port), with a clear error."""
    host, sep, port = str(text).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise OptionError(f"--farm {text!r}: expected HOST:PORT, e.g. 127.0.0.1:9190")
    return host, int(port)


def check_bind_host(host: str, allow_remote: bool) -> None:
    """Refuse a non-loopback address without ``allow_remote``; print the warning when allowed."""
    if host in LOOPBACK:
        return
    if not allow_remote:
        raise OptionError(f"--host {host}: binding the farm to a non-loopback address needs --allow-remote "
                          "(TVM RPC has no authentication)")
    print(NO_AUTH_WARNING.format(host=host), file=sys.stderr)


def free_port(host: str = "127.0.0.1") -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind((host if host not in ("0.0.0.0", "") else "", 0))
        return s.getsockname()[1]


@dataclass
class Service:
    role: str  # "tracker" or "server"
    key: str  # "" for the tracker
    port: int
    pid: int
    log: str

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        # a zombie (exited, not yet reaped) is not alive
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                return f.read().split(")")[-1].split()[0] != "Z"
        except OSError:
            return True

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM the service's process group (its workers too), SIGKILL what is left after ``grace_s``."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.pid, sig)
            except (ProcessLookupError, PermissionError):
                return
            deadline = time.time() + grace_s
            while time.time() < deadline:
                try:
                    os.killpg(self.pid, 0)
                except ProcessLookupError:
                    return
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(-self.pid, os.WNOHANG)
                time.sleep(0.1)


class Farm:
    """A tracker and its servers, described by the state file in ``root``."""

    def __init__(self, root: str | None = None):
        self.root = os.path.abspath(root or farm_dir())
        self.host = "127.0.0.1"
        self.services: list[Service] = []

    @property
    def state_file(self) -> str:
        return os.path.join(self.root, "farm.json")

    @property
    def connect_host(self) -> str:
        """The address clients on this machine use (a wildcard bind is reached through loopback)."""
        return "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host

    @property
    def tracker(self) -> Service | None:
        return next((s for s in self.services if s.role == "tracker"), None)

    @property
    def address(self) -> str:
        t = self.tracker
        return f"{self.host}:{t.port}" if t else ""

    def servers(self, key: str | None = None) -> list[Service]:
        return [s for s in self.services if s.role == "server" and (key is None or s.key == key)]

    # -- state ---------------------------------------------------------------------------------

    @classmethod
    def load(cls, root: str | None = None) -> "Farm":
        farm = cls(root)
        if not os.path.isfile(farm.state_file):
            raise OptionError(f"no farm running (no {farm.state_file}); start one with 'tvm-lut farm start'")
        with open(farm.state_file) as f:
            state = json.load(f)
        farm.host = state["host"]
        farm.services = [Service(**s) for s in state["services"]]
        return farm

    def save(self) -> None:
        os.makedirs(self.root, exist_ok=True)
        tmp = self.state_file + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"host": self.host, "services": [s.__dict__ for s in self.services]}, f, indent=1)
        os.replace(tmp, self.state_file)

    # -- lifecycle -----------------------------------------------------------------------------

    def _spawn(self, role: str, key: str, cmd: list[str]) -> Service:
        os.makedirs(self.root, exist_ok=True)
        port = int(cmd[cmd.index("--port") + 1])
        log = os.path.join(self.root, f"{role}-{key or 'main'}-{port}.log")
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        svc = Service(role, key, port, proc.pid, log)
        self.services.append(svc)
        self.save()
        return svc

    def start(self, x86: int = 1, arm: int = 0, host: str = "127.0.0.1", port: int | None = None,
              allow_remote: bool = False, timeout_s: float = 180.0, log=print) -> "Farm":
        """Start a tracker and ``x86`` + ``arm`` servers; returns when all have registered."""
        check_bind_host(host, allow_remote)
        if os.path.isfile(self.state_file):
            running = Farm.load(self.root)
            if running.tracker and running.tracker.alive():
                raise OptionError(f"a farm is already running at {running.address} (state {self.state_file}); "
                                  "stop it first with 'tvm-lut farm stop'")
        if x86 < 0 or arm < 0 or x86 + arm < 1:
            raise OptionError("a farm needs at least one server (--x86 N and/or --arm N)")
        arm_python = None
        if arm:
            from tvm_lut.targets import arm_emulator

            reason = arm_emulator.unavailable_reason()
            if reason:
                raise TargetError(f"cannot start arm64 servers: {reason}")
            arm_python = arm_emulator.python_wrapper()
        self.host = host
        self.services = []
        tport = port or free_port(host)
        self._spawn("tracker", "", [sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", host,
                                    "--port", str(tport), "--port-end", str(tport + 1)])
        self.wait_for_tracker(timeout_s=30)
        for key, count, python in (("x86", x86, sys.executable), ("arm64", arm, arm_python)):
            for _ in range(count):
                sport = free_port(host)
                self._spawn("server", key, [python, "-m", "tvm.exec.rpc_server", "--host", host,
                                            "--port", str(sport), "--port-end", str(sport + 1),
                                            "--tracker", f"{self.connect_host}:{tport}", "--key", key])
        log(f"farm: tracker {host}:{tport}; waiting for {x86} x86 + {arm} arm64 servers to register"
            + (" (arm64 servers import TVM under qemu: 20-60 s)" if arm else ""))
        self.wait_for_servers({"x86": x86, "arm64": arm}, timeout_s=timeout_s)
        return self

    def stop(self) -> None:
        """Stop every service (servers first) and remove the state file."""
        for svc in reversed(self.services):
            svc.stop()
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.state_file)

    # -- queries -------------------------------------------------------------------------------

    def summary(self) -> dict:
        """The tracker's ``summary()``: ``queue_info`` {key: {free, pending}} and ``server_info``."""
        from tvm import rpc

        return rpc.connect_tracker(self.connect_host, self.tracker.port).summary()

    def registered(self) -> dict[str, int]:
        """Servers the tracker knows, by key."""
        counts: dict[str, int] = {}
        for info in self.summary().get("server_info", []):
            key = str(info.get("key", "")).split(":")[-1]
            counts[key] = counts.get(key, 0) + 1
        return counts

    def tracker_listening(self) -> bool:
        """A plain TCP connect (``rpc.connect_tracker`` would retry for a minute with warnings)."""
        try:
            with socket.create_connection((self.connect_host, self.tracker.port), timeout=1.0):
                return True
        except OSError:
            return False

    def wait_for_tracker(self, timeout_s: float) -> None:
        deadline = time.time() + timeout_s
        while True:
            tracker = self.tracker
            if not tracker.alive():
                raise TargetError(f"the RPC tracker exited; see {tracker.log}:\n{_tail(tracker.log)}")
            if self.tracker_listening():
                return
            if time.time() > deadline:
                self.stop()
                raise TargetError(f"the RPC tracker did not answer within {timeout_s:.0f} s; see {tracker.log}")
            time.sleep(0.3)

    def wait_for_servers(self, expected: dict[str, int], timeout_s: float) -> None:
        deadline = time.time() + timeout_s
        while True:
            dead = [s for s in self.servers() if not s.alive()]
            if dead:
                self.stop()
                raise TargetError(f"an RPC server ({dead[0].key}) exited while starting; see {dead[0].log}:\n"
                                  f"{_tail(dead[0].log)}")
            got = self.registered()
            if all(got.get(k, 0) >= n for k, n in expected.items()):
                return
            if time.time() > deadline:
                self.stop()
                raise TargetError(f"servers did not register within {timeout_s:.0f} s (registered: {got}); "
                                  f"logs in {self.root}")
            time.sleep(0.5)

    def status_text(self) -> str:
        lines = [f"farm {self.address} (state {self.state_file})"]
        reg, queue = {}, {}
        if self.tracker_listening():
            reg = self.registered()
            queue = self.summary().get("queue_info", {})
        else:
            lines.append("  tracker not answering")
        for s in self.services:
            state = "running" if s.alive() else "DEAD"
            lines.append(f"  {s.role:<8} {s.key or '-':<6} port {s.port:<6} pid {s.pid:<8} {state}")
        for key in sorted(set(reg) | set(queue)):
            q = queue.get(key, {})
            lines.append(f"  key {key}: {reg.get(key, 0)} registered, {q.get('free', 0)} free, "
                         f"{q.get('pending', 0)} pending")
        return "\n".join(lines)


def _tail(path: str, n: int = 15) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""


# ----------------------------------------------------------------------------------------------
# Running on a farm device
# ----------------------------------------------------------------------------------------------


def request(address: str, key: str, timeout_s: float = 120.0):
    """An RPC session on a server of ``key`` registered with the tracker at ``HOST:PORT``."""
    from tvm import rpc

    host, port = parse_address(address)
    try:
        tracker = rpc.connect_tracker(host, port)
    except Exception as exc:
        raise TargetError(f"cannot reach the RPC tracker at {address}: {exc}") from None
    free = tracker.summary().get("queue_info", {}).get(key)
    if free is None:
        raise TargetError(f"no server with key {key!r} is registered at {address}")
    return tracker.request(key, priority=1, session_timeout=timeout_s)
