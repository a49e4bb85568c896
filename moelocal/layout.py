"""Which device each tensor lands on for a placement, by llama.cpp's own rules.

The single place that turns a Placement into tensor locations; the memory model (bytes per device)
and the speed model (bytes read per token per device) both start from it.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from moelocal.errors import UsageError
from moelocal.gguf_model import ModelSummary, TensorInfo
from moelocal.hardware import Hardware
from moelocal.plan import CPU, Placement

# llama.cpp's --cpu-moe / --n-cpu-moe pattern (common/common.h: LLM_FFN_EXPS_REGEX).
EXPS_REGEX = r"\.ffn_(up|down|gate|gate_up)_(ch|)exps"


def n_cpu_moe_overrides(n: int) -> tuple[tuple[str, str], ...]:
    """The overrides `--n-cpu-moe n` makes: routed experts of layers 0..n-1 stay in host memory."""
    return tuple((rf"blk\.{i}{EXPS_REGEX}", CPU) for i in range(n))


def cpu_moe_overrides() -> tuple[tuple[str, str], ...]:
    """The override `--cpu-moe` makes: every routed expert stays in host memory."""
    return ((EXPS_REGEX, CPU),)


def last_n_cpu_moe_overrides(n: int, n_layer: int) -> tuple[tuple[str, str], ...]:
    """Routed experts of the last ``n`` repeating layers in host memory, as one compact override
    (what llama.cpp's own --fit does: ``blk\\.(4[0-7])\\.ffn_(up|down|gate|gate_up)_(ch|)exps=CPU``)."""
    n = max(0, min(n, n_layer))
    if n == 0:
        return ()
    return ((rf"blk\.({int_range_regex(n_layer - n, n_layer - 1)}){EXPS_REGEX}", CPU),)


def int_range_regex(lo: int, hi: int) -> str:
    """An alternation that matches exactly the decimal numbers lo..hi ('3[6-9]|4[0-7]'); used between
    ``blk\\.`` and ``\\.``, which anchor it."""
    parts: list[str] = []
    n = lo
    while n <= hi:
        # the largest block n..m that shares every digit but the last few (n..n+10^k-1, aligned)
        k = 0
        while k + 1 < len(str(n)) and n % 10 ** (k + 1) == 0 and n + 10 ** (k + 1) - 1 <= hi:
            k += 1
        if k == 0:
            m = min(hi, n - n % 10 + 9)  # the rest of this decade: 36..39
            head, d0, d1 = str(n)[:-1], n % 10, m % 10
            parts.append(head + (str(d0) if d0 == d1 else f"[{d0}-{d1}]"))
            n = m + 1
        else:
            # whole decades (or hundreds): 40..79 -> [4-7][0-9]; n is a multiple of 10^k here
            step = 10**k
            last = n + ((hi - n + 1) // step) * step - 1  # the last full block of this size
            top = min(last, n - n % (step * 10) + step * 10 - 1)  # stay inside the next digit up
            head, a, b = str(n // step)[:-1], (n // step) % 10, (top // step) % 10
            parts.append(head + (str(a) if a == b else f"[{a}-{b}]") + "[0-9]" * k)
            n = top + 1
    return "|".join(parts)


_GPU_BUFT = re.compile(r"(CUDA|ROCm|Vulkan|SYCL|MTL|Metal|MUSA|CANN|OpenCL)(\d*)", re.IGNORECASE)
_RPC_BUFT = re.compile(r"RPC(\d*)\[([^\]]+)\]", re.IGNORECASE)


def override_device(name: str, hw: Hardware) -> str:
    """The plan device (cpu, gpuN, rpcN) for a buffer type named as llama.cpp's -ot takes it: CPU,
    CUDA0, Vulkan1, RPC0[host:port] (the worker's first device; RPC[host:port] too), or moelocal's own
    names. Raises UsageError naming the ones that exist here."""
    text = name.strip()
    names = hw.gpu_names
    if text.lower() == CPU or text.lower() in names:
        return text.lower()
    m = _GPU_BUFT.fullmatch(text)
    if m:
        i = int(m.group(2) or 0)
        local = [n for n in names if n.startswith("gpu")]
        if i < len(local):
            return local[i]
    m = _RPC_BUFT.fullmatch(text)
    if m:
        from moelocal.rpc import normalize_endpoint

        want, index = m.group(2), int(m.group(1) or 0)
        try:
            want = normalize_endpoint(want)
        except UsageError:
            pass
        for dev, g in zip(names, hw.gpus, strict=True):
            if g.remote and g.endpoint == want and g.remote_index == index:
                return dev
    raise UsageError(f"-ot: unknown buffer type {text!r}", "buffer types here: " + ", ".join(buffer_type_names(hw)))


def buffer_type_names(hw: Hardware) -> list[str]:
    """The buffer type names -ot accepts on ``hw``, as llama.cpp names them."""
    out = ["CPU"]
    n_local = 0
    for g in hw.gpus:
        if g.remote:
            out.append(f"RPC{g.remote_index}[{g.endpoint}]")
        else:
            out.append({"metal": "Metal", "vulkan": f"Vulkan{n_local}"}.get(g.backend, f"CUDA{n_local}"))
            n_local += 1
    return out


def parse_tensor_overrides(values: Sequence[str], hw: Hardware) -> tuple[tuple[str, str], ...]:
    """llama.cpp's ``-ot/--override-tensor`` values (each ``PATTERN=BUFFER_TYPE[,PATTERN=BUFFER_TYPE...]``,
    repeatable) as (regex, plan device) pairs in the order given: the first pattern that a tensor's
    name contains (regex search, not a full match) decides where it goes."""
    out: list[tuple[str, str]] = []
    for value in values:
        for item in str(value).split(","):
            if not item.strip():
                continue
            pattern, eq, target = item.partition("=")
            if not eq or not pattern:
                raise UsageError(f"-ot {item!r}: expected PATTERN=BUFFER_TYPE",
                                 r"e.g. -ot 'blk\.(4[0-7])\.ffn_.*_exps=CPU'")
            try:
                re.compile(pattern)
            except re.error as exc:
                raise UsageError(f"-ot {item!r}: {pattern!r} is not a valid regular expression ({exc})") from None
            out.append((pattern, override_device(target, hw)))
    return tuple(out)


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
