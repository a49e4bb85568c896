"""Consoles: stdout carries data (text, JSON), stderr carries everything meant for people."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console

from moelocal.units import human_bytes, human_count  # noqa: F401  (commands format through here)

out = Console(soft_wrap=True, highlight=False)
err = Console(stderr=True, highlight=False)


def print_json(data: Any) -> None:
    """Plain JSON on stdout, pretty only when a person is looking."""
    if sys.stdout.isatty():
        out.print_json(data=data)
    else:
        sys.stdout.write(json.dumps(data) + "\n")
        sys.stdout.flush()


def note(message: str) -> None:
    err.print(f"[dim]{message}[/dim]")


def warn(message: str) -> None:
    err.print(f"[yellow]Warning:[/yellow] {message}")
