"""Which device each tensor lands on for a placement, by llama.cpp's own rules.

The single place that turns a Placement into tensor locations; the memory model (bytes per device)
and the speed model (bytes read per token per device) both start from it.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass
from functools import lru_cache

from moelocal.gguf_model import ModelSummary, TensorInfo
from moelocal.plan import CPU, Placement

# llama.cpp's --cpu-moe / --n-cpu-moe pattern (common/common.h: LLM_FFN_EXPS_REGEX).
EXPS_REGEX = r"\.ffn_(up|down|gate|gate_up)_(ch|)exps"


def n_cpu_moe_overrides(n: int) -> tuple[tuple[str, str], ...]:
    """The overrides `--n-cpu-moe n` makes: routed experts of layers 0..n-1 stay in host memory."""
    return tuple((rf"blk\.{i}{EXPS_REGEX}", CPU) for i in range(n))


def cpu_moe_overrides() -> tuple[tuple[str, str], ...]:
    """The override `--cpu-moe` makes: every routed expert stays in host memory."""
    return ((EXPS_REGEX, CPU),)


def layer_devices(n_layer: int, placement: Placement) -> list[str]:
    """Device of each repeating layer and, last, of the output layer (index n_layer)."""
    devices = placement.devices
    ngl = max(placement.n_gpu_layers, 0)
    if not devices or ngl == 0:
        return [CPU] * (n_layer + 1)
    start = max(n_layer + 1 - ngl, 0)
    active = min(ngl, n_layer + 1)
    split = list(placement.tensor_split) if placement.tensor_split else [1.0] * len(devices)
    if len(split) != len(devices) or sum(split) <= 0:
        split = [1.0] * len(devices)
    cum, total = [], 0.0
    for s in split:
        total += s
        cum.append(total)
    cum = [c / total for c in cum]
    out = []
    for il in range(n_layer + 1):
        if il < start or il - start >= active:
            out.append(CPU)
        else:
            idx = bisect.bisect_right(cum, (il - start) / active)
            out.append(devices[min(idx, len(devices) - 1)])
    return out


@dataclass(frozen=True)
class Located:
    tensor: TensorInfo
    device: str
    duplicate: bool = False  # a tied output head copied from the token embeddings


def locate(summary: ModelSummary, placement: Placement) -> tuple[Located, ...]:
    """Every tensor with its device (plus the copy llama.cpp makes of a tied output head)."""
    return _locate(summary, placement)


@lru_cache(maxsize=512)
def _locate(summary: ModelSummary, placement: Placement) -> tuple[Located, ...]:
    per_layer = layer_devices(summary.n_layer, placement)
    forced: dict[str, str] = {}
    for pattern, target in placement.tensor_overrides:  # llama.cpp: the first matching override wins
        for name in _hits(summary, pattern):
            forced.setdefault(name, target)
    out = []
    has_output = False
    for t in summary.loaded_tensors:  # MTP layers llama.cpp leaves out take no memory
        if t.layer is not None and t.layer < summary.n_layer:
            dev = per_layer[t.layer]
        elif t.role == "embeddings" or t.name.startswith("token_embd"):
            dev = CPU  # llama.cpp always keeps the input layer on the CPU
        elif t.name.startswith("output"):
            dev = per_layer[summary.n_layer]
            has_output = has_output or t.name.startswith("output.")
        else:
            dev = per_layer[summary.n_layer] if t.layer is None else CPU
        dev = forced.get(t.name, dev)
        out.append(Located(t, dev))
    out_dev = per_layer[summary.n_layer]
    if not has_output and out_dev != CPU:
        emb = next((t for t in summary.tensors if t.name == "token_embd.weight"), None)
        if emb is not None:
            out.append(Located(emb, out_dev, duplicate=True))
    return tuple(out)


@lru_cache(maxsize=4096)
def _hits(summary: ModelSummary, pattern: str) -> frozenset[str]:
    """Names of the tensors an override pattern matches (std::regex_search semantics)."""
    rx = re.compile(pattern)
    return frozenset(t.name for t in summary.tensors if rx.search(t.name))


def bytes_by_device(summary: ModelSummary, placement: Placement) -> dict[str, int]:
    """Weight bytes per device."""
    out: dict[str, int] = {}
    for loc in locate(summary, placement):
        out[loc.device] = out.get(loc.device, 0) + loc.tensor.n_bytes
    return out
