"""This machine's measured speeds: what `moelocal bench` and the runs measured, kept per machine.

One JSON file in moelocal's app dir holds, for each machine (CPU model, cores, RAM, local GPUs),
backend and llama.cpp version, the records of the sessions that measured it: each record keeps the
factors speed.calibrate found for its measurements, so that later predictions need no model file.
``load`` combines them (geometric mean; the median from three records on) into the speed.Calibration
that hardware.detect attaches and speed.predict uses. Nothing here runs a model.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moelocal.hardware import Hardware

if TYPE_CHECKING:
    from moelocal.gguf_model import ModelSummary
    from moelocal.plan import Placement, RunOptions
    from moelocal.speed import Calibration, Measured

FILE_VERSION = 1
MAX_RECORDS = 32  # per machine: the newest are kept
FACTORS = ("cpu_decode_eff", "cpu_prefill_eff", "gpu_decode_eff", "gpu_prefill_eff")
# A run's numbers are worth recording only past these sizes: a few tokens measure start-up, not speed.
MIN_DECODE_TOKENS = 16
MIN_PROMPT_TOKENS = 128
GiB = 1 << 30


def path() -> Path:
    """Where the calibration file lives (moelocal's app dir; MOELOCAL_HOME moves it)."""
    from moelocal import config

    return config.cache_dir("calibration") / "calibration.json"


def llama_cpp_version() -> str:
    """The installed llama-cpp-python's version, without importing (loading) it."""
    from importlib import metadata

    try:
        return metadata.version("llama_cpp_python")
    except metadata.PackageNotFoundError:
        return "unknown"


def machine(hw: Hardware) -> dict[str, Any]:
    """What identifies this machine, backend and llama.cpp for the calibration: detected values only."""
    local = [g for g in hw.gpus if not g.remote]
    return {
        "cpu": hw.cpu_name,
        "cores": hw.cpu_cores,
        "ram_gib": round(hw.ram_total / GiB),
        "gpus": [f"{g.name} {round(g.total / GiB)}GiB" for g in local],
        "backend": local[0].backend if local else "cpu",
        "llama_cpp": llama_cpp_version(),
    }


def key(hw: Hardware) -> str:
    m = machine(hw)
    return " | ".join([m["cpu"], f"{m['cores']} cores", f"{m['ram_gib']} GiB", *m["gpus"], m["backend"],
                       f"llama.cpp {m['llama_cpp']}"])


@dataclass(frozen=True)
class Record:
    """One session's measurements: a bench, or one run of chat / generate / batch / serve."""

    source: str  # bench | chat | generate | batch | serve
    model: str
    placement: str  # for people: Placement.describe
    factors: dict[str, float]  # speed.Calibration's fields this session's measurements gave
    tests: tuple[dict[str, Any], ...] = ()  # what was measured (test, tokens/s, predicted)
    when: float = field(default_factory=time.time)
    session: str = ""  # records of one process replace each other

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "model": self.model, "placement": self.placement, "factors": self.factors,
                "tests": list(self.tests), "when": self.when, "session": self.session}


def _read() -> dict[str, Any]:
    try:
        data = json.loads(path().read_text())
    except (OSError, ValueError):
        return {"version": FILE_VERSION, "machines": {}}
    if not isinstance(data, dict) or data.get("version") != FILE_VERSION or not isinstance(data.get("machines"), dict):
        return {"version": FILE_VERSION, "machines": {}}
    return data


def _write(data: dict[str, Any]) -> None:
    p = path()
    tmp = p.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, p)  # readers see the old file or the new one, never half of one


def records(hw: Hardware) -> list[dict[str, Any]]:
    """This machine's records, oldest first."""
    return list(_read()["machines"].get(key(hw), {}).get("records", []))


def load(hw: Hardware) -> Calibration | None:
    """The calibration of this machine (None when nothing was measured on it yet)."""
    from moelocal.speed import Calibration

    recs = records(hw)
    if not recs:
        return None
    values: dict[str, list[float]] = {f: [] for f in FACTORS}
    for r in recs:
        for f in FACTORS:
            v = (r.get("factors") or {}).get(f)
            if isinstance(v, (int, float)) and v > 0:
                values[f].append(float(v))
    factors = {f: _combine(v) for f, v in values.items()}
    kinds = sorted({r.get("source", "") for r in recs})
    last = time.strftime("%Y-%m-%d", time.localtime(max(r.get("when", 0) for r in recs)))
    source = ("moelocal bench" if kinds == ["bench"] else "moelocal " + ", ".join(kinds)) + f", {last}"
    return Calibration(**factors, runs=len(recs), source=source)


def _combine(values: list[float]) -> float | None:
    """One factor from several records: their geometric mean, or from three on their median, so that one
    run on a busy machine (a chat while something else ran) moves the calibration only so far."""
    if not values:
        return None
    if len(values) >= 3:
        return round(statistics.median(values), 4)
    return round(math.exp(sum(map(math.log, values)) / len(values)), 4)


def add(hw: Hardware, record: Record) -> None:
    """Add ``record`` to this machine's (replacing an earlier record of the same session)."""
    if not any(v for v in record.factors.values()):
        return
    data = _read()
    entry = data["machines"].setdefault(key(hw), {"machine": machine(hw), "records": []})
    recs = [r for r in entry["records"] if not (record.session and r.get("session") == record.session)]
    recs.append(record.to_dict())
    entry["records"] = recs[-MAX_RECORDS:]
    _write(data)


def reset(hw: Hardware) -> int:
    """Forget this machine's calibration; returns how many records went."""
    data = _read()
    gone = data["machines"].pop(key(hw), None)
    if gone is not None:
        _write(data)
    return len(gone.get("records", [])) if gone else 0


def attach(hw: Hardware) -> Hardware:
    """``hw`` with this machine's calibration (what hardware.detect returns); a broken file is no calibration."""
    try:
        return replace(hw, calibration=load(hw))
    except Exception:  # the file is a cache of measurements: never worth failing a command for
        return hw


def applies(hw: Hardware) -> bool:
    """Whether this machine's calibration describes ``hw``: not when the user described another machine
    (bandwidths, GPUs, VRAM); leaving the GPUs out (--no-gpu) or planning for less RAM still does."""
    return not (set(hw.overridden) - {"no_gpu", "ram", "worker_mem", "net_bw"})


def recording() -> bool:
    """Whether runs add what they measure (MOELOCAL_NO_CALIBRATE=1 turns it off)."""
    from moelocal import config

    return config.calibrate_runs()


def at_depth(options: RunOptions, depth: int, n_ubatch: int | None = None) -> RunOptions:
    """``options`` as the speed model needs them to predict a decode at ``depth`` tokens of context
    (it reads the KV cache at n_ctx/2) and a prompt in batches of ``n_ubatch``."""
    out = replace(options, n_ctx=max(2 * depth, 2))
    if n_ubatch is not None:
        out = replace(out, n_ubatch=max(1, min(n_ubatch, options.n_ubatch)))
    return out


def factors(runs: Sequence[Measured], hw: Hardware) -> dict[str, float]:
    """The factors speed.calibrate finds for these measurements (each a speed.Measured: what ran, at
    which depth and batch, and the tokens/s measured), without those it could not find."""
    from moelocal import speed

    runs = [r for r in runs if (r.decode_tps or 0) > 0 or (r.prefill_tps or 0) > 0]
    if not runs:
        return {}
    cal = speed.calibrate(runs, hw)
    return {f: getattr(cal, f) for f in FACTORS if getattr(cal, f)}


class Recorder:
    """Adds what a run measures (each request's prompt and decode speed) to this machine's record.

    One record per process (``session``), rewritten as requests finish, so that a long `serve` is one
    run among the others. Sequences decoded side by side (batch -np, serve --parallel) are not a
    single stream's speed and are left out."""

    def __init__(self, summary: ModelSummary, placement: Placement, options: RunOptions, hw: Hardware,
                 source: str) -> None:
        self.summary, self.placement, self.options, self.hw, self.source = summary, placement, options, hw, source
        self.session = f"{os.getpid()}-{time.time():.0f}"
        self.decode: list[tuple[RunOptions, float]] = []
        self.prompt: list[tuple[RunOptions, float]] = []

    def __call__(self, chunk: Any) -> None:
        """Take one request's last chunk (engine.Chunk); write the record when it measured something."""
        new = chunk.prompt_tokens - chunk.cached_tokens
        changed = False
        if chunk.completion_tokens >= MIN_DECODE_TOKENS and chunk.generation_tps > 0:
            depth = chunk.prompt_tokens + chunk.completion_tokens // 2
            self.decode.append((at_depth(self.options, depth), chunk.generation_tps))
            changed = True
        if new >= MIN_PROMPT_TOKENS and chunk.prompt_tps > 0:
            self.prompt.append((at_depth(self.options, chunk.cached_tokens + new // 2, new), chunk.prompt_tps))
            changed = True
        if not changed:
            return
        from moelocal.speed import Measured

        runs = [Measured(self.summary, self.placement, o, decode_tps=tps) for o, tps in self.decode[-16:]]
        runs += [Measured(self.summary, self.placement, o, prefill_tps=tps) for o, tps in self.prompt[-16:]]
        try:
            add(self.hw, Record(self.source, self.summary.name, self.placement.describe(self.summary.n_layer),
                                factors(runs, self.hw),
                                tests=({"decode_runs": len(self.decode), "prompt_runs": len(self.prompt)},),
                                session=self.session))
        except OSError:
            pass  # a read-only app dir: the run goes on without recording
