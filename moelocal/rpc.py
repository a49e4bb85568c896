"""Workers: llama.cpp's RPC server on this machine, and what a client needs to know about one.

A worker (``moelocal worker``) exposes its devices over TCP with llama.cpp's RPC backend; a client
places layers on them as on local GPUs. llama.cpp's client side aborts the whole process when it
cannot connect, and waits forever on a worker that is busy with another client (a worker serves one
client at a time), so a client checks each worker here first: a TCP connect and the protocol's own
HELLO, DEVICE_COUNT and GET_DEVICE_MEMORY messages, all with a timeout. The wire format is
ggml-rpc.cpp's (protocol 7.x): ``| cmd u8 | size u64 | payload |``, answered by ``| size u64 | payload |``.

Nothing here imports llama.cpp except :func:`serve`; probing a worker (``fit --worker``) is plain
sockets.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from moelocal import hardware
from moelocal.errors import MoelocalError, UsageError
from moelocal.hardware import Hardware, WorkerDevice, WorkerInfo  # defined below rpc: hardware facts

DEFAULT_PORT = 50052
PROBE_TIMEOUT_S = 5.0
PROTO_MAJOR, PROTO_MINOR = 7, 0  # ggml-rpc.h of the llama.cpp that llama-cpp-python 0.3.36 vendors
_CONN_CAPS_SIZE = 24
_CMD_GET_DEVICE_MEMORY, _CMD_HELLO, _CMD_DEVICE_COUNT = 11, 14, 15
# Dead-peer detection on the connections llama.cpp opens (see keep_alive).
KEEPALIVE_IDLE_S, KEEPALIVE_INTERVAL_S, KEEPALIVE_COUNT = 10, 5, 3
USER_TIMEOUT_S = 30


class WorkerError(MoelocalError):
    """A worker that cannot be reached, is busy, speaks another protocol, or could not start."""

    exit_code = 6


# ---- endpoints -------------------------------------------------------------------------------


def parse_endpoint(text: str) -> tuple[str, int]:
    """'host:port' (or 'host', for the default port) → (host, port)."""
    t = str(text).strip()
    if not t or t.startswith("[") or t.count(":") > 1:
        raise UsageError(f"cannot read worker address {text!r}", "write it as HOST:PORT, e.g. 192.168.1.20:50052 "
                         "(llama.cpp's RPC backend speaks IPv4 only)")
    host, _, port_text = t.partition(":")
    if not host:
        raise UsageError(f"worker address {text!r} has no host", "write it as HOST:PORT")
    if not port_text:
        return host, DEFAULT_PORT
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise UsageError(f"worker address {text!r} has no valid port", "ports go from 1 to 65535")
    return host, int(port_text)


def normalize_endpoint(text: str) -> str:
    host, port = parse_endpoint(text)
    return f"{host}:{port}"


# ---- probing a worker ------------------------------------------------------------------------


def probe(endpoint: str, timeout: float = PROBE_TIMEOUT_S) -> WorkerInfo:
    """Ask the worker at ``endpoint`` for its protocol version, devices and their memory.

    Raises WorkerError (one line, with what to do) for a name that does not resolve, a refused or
    timed-out connection, a worker that does not answer (busy with another client), or something
    that is not a compatible llama.cpp RPC server.
    """
    endpoint = normalize_endpoint(endpoint)
    host, port = parse_endpoint(endpoint)
    try:
        addr = socket.gethostbyname(host)  # IPv4, as llama.cpp resolves it
    except OSError:
        raise WorkerError(f"cannot resolve the worker host {host!r}",
                          "check the name, or give its IP address") from None
    try:
        sock = socket.create_connection((addr, port), timeout=timeout)
    except TimeoutError:
        raise WorkerError(f"the worker at {endpoint} did not accept a connection within {timeout:g} s",
                          "check the address, that `moelocal worker` runs there, and that no firewall blocks "
                          "the port") from None
    except ConnectionRefusedError:
        raise WorkerError(f"nothing listens at {endpoint}",
                          f"start `moelocal worker --port {port}` on that machine first") from None
    except OSError as exc:
        raise WorkerError(f"cannot reach the worker at {endpoint}: {exc.strerror or exc}") from None
    with sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            hello = _call(sock, _CMD_HELLO, bytes(_CONN_CAPS_SIZE), 4 + _CONN_CAPS_SIZE)
            version = (hello[0], hello[1], hello[2])
            if version[0] != PROTO_MAJOR or version[1] > PROTO_MINOR:
                raise WorkerError(
                    f"the worker at {endpoint} speaks RPC protocol {'.'.join(map(str, version))}; this llama.cpp "
                    f"speaks {PROTO_MAJOR}.{PROTO_MINOR}",
                    "install the same llama-cpp-python version on both machines",
                )
            (count,) = struct.unpack("<I", _call(sock, _CMD_DEVICE_COUNT, b"", 4))
            devices = []
            for i in range(count):
                free, total = struct.unpack("<QQ", _call(sock, _CMD_GET_DEVICE_MEMORY, struct.pack("<I", i), 16))
                devices.append(WorkerDevice(free=free, total=total))
        except TimeoutError:
            raise WorkerError(f"the worker at {endpoint} accepted the connection but did not answer within "
                              f"{timeout:g} s", "a worker serves one client at a time: is another moelocal or "
                              "llama.cpp using it?") from None
        except _NotRpc:
            raise WorkerError(f"the service at {endpoint} is not a llama.cpp RPC worker",
                              "check the port: `moelocal worker` listens on 50052 unless told otherwise") from None
        except OSError as exc:
            raise WorkerError(f"the worker at {endpoint} closed the connection: {exc.strerror or exc}") from None
    if not devices:
        raise WorkerError(f"the worker at {endpoint} serves no devices")
    return WorkerInfo(endpoint=endpoint, devices=tuple(devices), version=version)


class _NotRpc(Exception):
    pass


def _call(sock: socket.socket, cmd: int, payload: bytes, answer_size: int) -> bytes:
    sock.sendall(struct.pack("<BQ", cmd, len(payload)) + payload)
    (size,) = struct.unpack("<Q", _recv(sock, 8))
    if size != answer_size:
        raise _NotRpc()
    return _recv(sock, size)


def _recv(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        part = sock.recv(n - len(buf))
        if not part:
            raise _NotRpc() if not buf else ConnectionResetError(errno.ECONNRESET, "connection closed")
        buf += part
    return bytes(buf)


def with_workers(hw: Hardware, endpoints: Sequence[str], *, mem: Sequence[str] | None = None,
                 net_bw: str | None = None, timeout: float = PROBE_TIMEOUT_S) -> Hardware:
    """``hw`` with the devices of the workers at ``endpoints`` (probed now) added as rpc0, rpc1 ..."""
    eps = [normalize_endpoint(e) for e in endpoints]
    if len(set(eps)) != len(eps):
        raise UsageError("the same worker is given twice", "give each --worker once")
    return hardware.with_workers(hw, [probe(e, timeout) for e in eps], mem=mem, net_bw=net_bw)


def reachable(endpoint: str, timeout: float = 1.0) -> bool:
    """Whether anything accepts a TCP connection at ``endpoint`` (no protocol is spoken)."""
    try:
        host, port = parse_endpoint(endpoint)
        with socket.create_connection((socket.gethostbyname(host), port), timeout=timeout):
            return True
    except (OSError, MoelocalError):
        return False


# ---- guarding a client -----------------------------------------------------------------------


def guard_aborts(endpoints: Sequence[str], exit_code: int = WorkerError.exit_code) -> None:
    """When llama.cpp aborts because a worker dropped, end the process with one line instead.

    llama.cpp's RPC client has no way to report a lost connection: any failed send or receive ends in
    GGML_ABORT("Remote RPC server crashed or returned malformed response"), i.e. abort() and a core
    dump, from whichever thread noticed. The process cannot go on (the model's weights on the worker
    are gone), so this only turns the crash into ``Error: ...`` and ``exit_code``, naming the worker
    that no longer answers. Written straight to stderr: the C code is about to abort, so the CLI's
    error handler never gets the chance.
    """
    from moelocal import native

    eps = tuple(endpoints)

    def handler(message: str) -> None:
        text = message.split(": ", 1)[-1].strip()  # ggml prefixes "file:line: "
        if "ggml-rpc" not in message and "RPC" not in message:
            os.write(2, f"Error: llama.cpp aborted: {text}\n".encode())
            return  # not ours: let ggml abort as it would
        if _SILENT:
            who = ", ".join(_SILENT)
            line = (f"Error: the worker at {who} sent nothing for {max(_SILENT.values()):.0f} s while a step of "
                    f"the run waited on it; the run cannot go on (check that machine and its worker, restart the "
                    f"worker and run again; MOELOCAL_WORKER_TIMEOUT sets how long to wait)\n")
        else:
            gone = [ep for ep in eps if not reachable(ep)]
            who = ", ".join(gone) if gone else " or ".join(eps)
            line = (f"Error: lost the connection to the worker at {who} ({text}); the run cannot go on "
                    f"(restart the worker and run again)\n")
        try:
            sys.stdout.flush()
        except Exception:
            pass
        os.write(2, line.encode())
        os._exit(exit_code)

    native.on_abort(handler)


def keep_alive(endpoints: Sequence[str]) -> int:
    """Turn on TCP keepalive and a user timeout on this process's connections to ``endpoints``.

    llama.cpp opens them without either, so a worker machine that vanishes (power, cable, Wi-Fi)
    leaves the client waiting forever on a reply. With these, the kernel gives up after about
    ``USER_TIMEOUT_S`` (or the keepalive probes), llama.cpp's receive fails, and guard_aborts ends
    the run with a clear error. Linux only (see :func:`_connections`); returns how many connections
    it changed.
    """
    changed = 0
    for s, _ in _connections(endpoints):
        with s:
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                for opt, value in (("TCP_KEEPIDLE", KEEPALIVE_IDLE_S), ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL_S),
                                   ("TCP_KEEPCNT", KEEPALIVE_COUNT), ("TCP_USER_TIMEOUT", USER_TIMEOUT_S * 1000)):
                    if hasattr(socket, opt):
                        s.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), value)
                changed += 1
            except OSError:
                continue
    return changed


def _connections(endpoints: Sequence[str]) -> Iterator[tuple[socket.socket, str]]:
    """This process's TCP connections to ``endpoints``, each as a duplicate socket and its endpoint.

    llama.cpp does not hand out its sockets; on Linux they are found in /proc/self/fd. Each one is a
    duplicate: closing it (the caller must) leaves llama.cpp's socket open, while options set on it
    and ``shutdown`` act on the connection itself. Yields nothing where /proc is missing.
    """
    if not os.path.isdir("/proc/self/fd"):
        return
    peers = {}
    for ep in endpoints:
        host, port = parse_endpoint(ep)
        try:
            peers[(socket.gethostbyname(host), port)] = ep
        except OSError:
            continue
    for name in os.listdir("/proc/self/fd"):
        try:
            if not os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                continue
            s = socket.socket(fileno=os.dup(int(name)))
        except (OSError, ValueError):
            continue
        try:
            ep = peers.get(s.getpeername()) if s.family == socket.AF_INET else None
        except OSError:
            ep = None
        if ep is None:
            s.close()
            continue
        yield s, ep


# endpoint -> seconds it had sent nothing when the watchdog cut its connection (read by guard_aborts)
_SILENT: dict[str, float] = {}
_TCPI_LAST_DATA_RECV = 52  # offset of tcpi_last_data_recv (u32, ms) in Linux's struct tcp_info


def _quiet_for(s: socket.socket) -> float:
    """Seconds since ``s`` last received data (Linux's TCP_INFO); infinity where that is unknown."""
    try:
        info = s.getsockopt(socket.IPPROTO_TCP, getattr(socket, "TCP_INFO", 11), 104)
        return struct.unpack_from("=I", info, _TCPI_LAST_DATA_RECV)[0] / 1000
    except (OSError, struct.error):
        return float("inf")


class Watchdog:
    """Ends a run whose worker has stopped answering, instead of letting it hang.

    keep_alive covers a worker machine that disappears; a worker *process* that is stuck (stopped,
    swapping to death, wedged in a driver) still has a kernel that acknowledges every byte, so
    llama.cpp would wait on its reply forever, deaf to Ctrl-C. While a llama_decode call is in flight
    (``wrap``), this thread checks every connection to the workers once the call has run ``timeout``
    seconds: one that has received nothing for that long is shut down, llama.cpp's receive fails,
    and guard_aborts ends the process with one line that says which worker and how long. A worker
    that is merely slow keeps sending results of each micro-batch and is left alone.
    """

    def __init__(self, endpoints: Sequence[str], timeout: float) -> None:
        self.endpoints = tuple(endpoints)
        self.timeout = timeout
        self._since: float | None = None  # when the llama_decode call in flight began
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="moelocal-worker-watchdog", daemon=True)
        self._thread.start()

    def wrap(self, decode: Callable[..., int]) -> Callable[..., int]:
        def watched(ctx: object, batch: object) -> int:
            self._since = time.monotonic()
            try:
                return decode(ctx, batch)
            finally:
                self._since = None

        return watched

    def close(self) -> None:
        self._closed.set()

    def _watch(self) -> None:
        while not self._closed.wait(min(1.0, self.timeout / 4)):
            since = self._since
            if since is None or time.monotonic() - since < self.timeout:
                continue
            waited = time.monotonic() - since
            for s, ep in _connections(self.endpoints):
                with s:
                    quiet = min(waited, _quiet_for(s))
                    if quiet >= self.timeout:
                        _SILENT[ep] = quiet
                        try:
                            s.shutdown(socket.SHUT_RDWR)
                        except OSError:
                            pass


# ---- running a worker ------------------------------------------------------------------------


@dataclass(frozen=True)
class ServedDevice:
    name: str  # ggml's: CPU, CUDA0, Metal ...
    description: str
    free: int
    total: int
    handle: int


@dataclass(frozen=True)
class WorkerSpec:
    """A worker ready to start: where it listens and what it serves."""

    host: str
    port: int
    devices: tuple[ServedDevice, ...]
    threads: int

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def loopback(self) -> bool:
        return ipaddress.IPv4Address(self.host).is_loopback

    def to_dict(self) -> dict:
        return {
            "endpoint": self.endpoint,
            "loopback": self.loopback,
            "threads": self.threads,
            "devices": [{"name": d.name, "description": d.description, "free": d.free, "total": d.total}
                        for d in self.devices],
        }


def bind_address(host: str, allow_remote: bool) -> str:
    """The IPv4 address to listen on; anything but loopback needs ``allow_remote``."""
    h = "127.0.0.1" if host.strip().lower() == "localhost" else host.strip()
    try:
        ip = ipaddress.IPv4Address(h)
    except ValueError:
        raise UsageError(f"--host {host!r} is not an IPv4 address",
                         "llama.cpp's RPC server listens on one IPv4 address: 127.0.0.1, 0.0.0.0 or this "
                         "machine's LAN address") from None
    if not ip.is_loopback and not allow_remote:
        raise UsageError(f"listening on {h} would let anyone who can reach this machine use it: llama.cpp's RPC "
                         "protocol has no authentication",
                         "keep the default 127.0.0.1 (and tunnel over SSH), or add --allow-remote on a network "
                         "you trust")
    return h


def check_port(host: str, port: int) -> None:
    """Fail early, with a clear line, when the port cannot be listened on."""
    if not 0 < port < 65536:
        raise UsageError(f"--port must be 1 to 65535, got {port}")
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as llama.cpp does
        try:
            s.bind((host, port))
            s.listen(1)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise WorkerError(f"port {port} on {host} is already in use",
                                  "is a worker already running? pick another with --port") from None
            if exc.errno == errno.EADDRNOTAVAIL:
                raise UsageError(f"{host} is not an address of this machine", "use 127.0.0.1, 0.0.0.0 or one "
                                 "of this machine's addresses") from None
            if exc.errno == errno.EACCES:
                raise WorkerError(f"not allowed to listen on port {port}", "use a port above 1023") from None
            raise WorkerError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def prepare(host: str = "127.0.0.1", port: int = DEFAULT_PORT, devices: Sequence[str] = (),
            threads: int | None = None, allow_remote: bool = False) -> WorkerSpec:
    """Check everything a worker needs before it starts: address, port, devices, threads.

    ``devices`` are ggml device names (CUDA0, Vulkan1, CPU ...); none means every local GPU, or the CPU
    when there is none (llama.cpp's rpc-server does the same).
    """
    from moelocal import native

    addr = bind_address(host, allow_remote)
    check_port(addr, port)
    if threads is not None and threads <= 0:
        raise UsageError(f"--threads must be positive, got {threads}")
    local = [d for d in native.devices() if d.backend != "RPC"]
    chosen = []
    if devices:
        by_name = {d.name.lower(): d for d in local}
        for want in [w.strip() for part in devices for w in str(part).split(",") if w.strip()]:
            d = by_name.get(want.lower())
            if d is None:
                raise UsageError(f"no device {want!r} here", "devices here: " + ", ".join(d.name for d in local))
            if d not in chosen:
                chosen.append(d)
    else:
        chosen = [d for d in local if d.kind not in ("cpu", "accel")] or [d for d in local if d.kind == "cpu"]
    if not chosen:
        raise WorkerError("llama.cpp sees no device to serve", "reinstall llama-cpp-python")
    if threads is None:
        threads = hardware.default_threads()
    served = tuple(ServedDevice(d.name, d.description, d.free, d.total, d.handle) for d in chosen)
    return WorkerSpec(host=addr, port=port, devices=served, threads=threads)


def serve(spec: WorkerSpec, on_log: Callable[[int, str], None] | None = None) -> None:
    """Run the worker until the process is ended (Ctrl-C: SIGINT is set back to its default, since
    Python could not handle it while llama.cpp blocks). Raises WorkerError if it cannot start."""
    import signal

    from moelocal import native

    if on_log is not None:
        native.set_log_echo(on_log)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    native.rpc_start_server(spec.endpoint, [d.handle for d in spec.devices], spec.threads)
    # llama.cpp returns only when it could not listen (or accept): someone took the port meanwhile
    raise WorkerError(f"the worker could not listen on {spec.endpoint}", "is another worker using the port?")
