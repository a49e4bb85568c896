"""A llama.cpp RPC worker on loopback for the tests that offload to it (real placement, no GPU)."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def rpc_worker(argv: Callable[[int], list[str]], log_dir: Path) -> Iterator[str]:
    """Runs ``argv(port)`` on a free loopback port, waits until it listens (llama.cpp aborts a process
    that connects to nothing), yields "127.0.0.1:PORT", and kills it afterwards."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    err = open(log_dir / "err", "w+")  # noqa: SIM115  closed below
    proc = subprocess.Popen(argv(port), stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    err.seek(0)
                    pytest.fail(f"the RPC worker did not start: {err.read()[-2000:]}")
                time.sleep(0.1)
        yield f"127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait(timeout=10)
        err.close()
