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
