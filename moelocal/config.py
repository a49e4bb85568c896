"""Environment variables and the app directory: read here and nowhere else."""

from __future__ import annotations

import os
from pathlib import Path


def debug() -> bool:
    """MOELOCAL_DEBUG=1 shows tracebacks for bug reports."""
    return os.environ.get("MOELOCAL_DEBUG", "") not in ("", "0", "false")


def app_dir() -> Path:
    """moelocal's own state (caches of headers and measurements); weights live in the HF cache."""
    base = os.environ.get("MOELOCAL_HOME")
    if base:
        return Path(base).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "moelocal"


def cache_dir(name: str) -> Path:
    path = app_dir() / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def worker_timeout() -> float:
    """MOELOCAL_WORKER_TIMEOUT: seconds a run waits on an RPC worker that sends nothing (default 120)."""
    from moelocal.errors import UsageError

    raw = os.environ.get("MOELOCAL_WORKER_TIMEOUT", "").strip()
    if not raw:
        return 120.0
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise UsageError(f"MOELOCAL_WORKER_TIMEOUT={raw} is not a number of seconds",
                         "set it to a positive number, e.g. 300, or unset it for the default of 120")
    return value


def calibrate_runs() -> bool:
    """MOELOCAL_NO_CALIBRATE=1: chat, generate, batch and serve do not add what they measure to this
    machine's calibration (`moelocal bench` always does)."""
    return os.environ.get("MOELOCAL_NO_CALIBRATE", "") in ("", "0", "false")
