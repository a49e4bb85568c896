"""`moelocal worker`: lend this machine's devices to moelocal (or llama.cpp) on another machine."""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from moelocal import _output
from moelocal.commands._common import JsonOpt
from moelocal.rpc import DEFAULT_PORT


def worker(
    host: Annotated[str, typer.Option("--host", help="Address to listen on. Anything but loopback needs "
                                      "--allow-remote.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", "-p", help="Port to listen on.")] = DEFAULT_PORT,
    device: Annotated[list[str] | None, typer.Option("--device", "-d", help="Device to serve, by llama.cpp's "
                                                     "name (CUDA0, Vulkan1, CPU); repeat or comma-separate. "
                                                     "Default: every GPU, else the CPU.")] = None,
    threads: Annotated[int | None, typer.Option("--threads", "-t", help="CPU threads, when serving the CPU. "
                                                "Default: one per physical core.")] = None,
    allow_remote: Annotated[bool, typer.Option("--allow-remote", help="Allow listening on a non-loopback "
                                               "address. The protocol has no authentication: anyone who "
                                               "reaches the port can use the devices and read what they "
                                               "hold.")] = False,
    json: JsonOpt = False,
) -> None:
    """Serve this machine's GPUs (or its CPU) to moelocal on another machine, over llama.cpp's RPC.

    The other machine adds `--worker HOST:PORT` to fit, chat, generate, batch or serve, and places
    layers on these devices as on its own GPUs. A worker serves one client at a time. It runs until
    you stop it (Ctrl-C).

    By default it listens on 127.0.0.1 only: reach it from the other machine through an SSH tunnel
    (ssh -N -L 50052:127.0.0.1:50052 THIS-MACHINE), or add --allow-remote and listen on a LAN address
    of a network you trust. llama.cpp's RPC protocol has no authentication.

    With --json, prints one line on stdout once the worker is set up: its endpoint and devices.

    Examples:

      moelocal worker

      moelocal worker --host 192.168.1.20 --allow-remote --device CUDA0
    """
    from moelocal import rpc

    spec = rpc.prepare(host=host, port=port, devices=device or (), threads=threads, allow_remote=allow_remote)
    hb = _output.human_bytes
    if not spec.loopback:
        _output.warn(f"listening on {spec.host}: llama.cpp's RPC protocol has no authentication; anyone who can "
                     "reach this port can use these devices and read what they hold. Use it on a network you trust.")
    served = ", ".join(f"{d.name} ({d.description}, {hb(d.free)} free of {hb(d.total)})" for d in spec.devices)
    _output.err.print(f"Worker listening on [bold]{spec.endpoint}[/bold]: {served}")
    client = f"<this machine's address>:{spec.port}" if spec.host == "0.0.0.0" else spec.endpoint
    _output.note(f"On the client: --worker {client}" + (" (from another machine: through an SSH tunnel)"
                                                         if spec.loopback else "")
                 + ". One client at a time; Ctrl-C stops the worker.")
    if json:
        _output.print_json(spec.to_dict())
    sys.stdout.flush()
    # llama.cpp prints its own banner and every connection on C's stdout: send that to stderr, so
    # stdout carries only the JSON line
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    rpc.serve(spec, on_log=_echo_problems)


def _echo_problems(level: int, line: str) -> None:
    from moelocal import native

    if level in (native.LOG_WARN, native.LOG_ERROR) and line.strip():
        sys.stderr.write(line + "\n")


def register(app: typer.Typer) -> None:
    app.command("worker")(worker)
