"""The plan: one frozen value saying where every tensor lives, what it costs, and how fast it runs.

`fit` renders it, `--json` prints it, the engine applies it and the llama.cpp flags are derived from
it. Nothing else decides a placement.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

CPU = "cpu"
KV_TYPES = ("f16", "q8_0", "q4_0", "f32", "bf16")


def gpu(i: int) -> str:
    return f"gpu{i}"


@dataclass(frozen=True)
class Placement:
    """Where tensors go, in llama.cpp's own terms.

    ``n_gpu_layers`` follows ``-ngl``: llama.cpp offloads the output head first, then repeating
    layers from the last one down (``-ngl 1`` is the head alone; ``n_layer + 1`` is everything).
    ``n_cpu_moe`` keeps the routed experts of the first N layers in host memory, spelled out as
    ``tensor_overrides`` (regex, device) pairs that the engine hands to llama.cpp; with
    ``experts_last`` they are the experts of the *last* N layers instead (what llama.cpp's --fit
    does). Any other overrides (``-ot``) are kept as given, with ``n_cpu_moe`` 0.
    """

    n_gpu_layers: int = 0
    n_cpu_moe: int = 0
    tensor_overrides: tuple[tuple[str, str], ...] = ()
    devices: tuple[str, ...] = ()  # the GPUs (gpu0, gpu1, ...) layers are spread over, in order
    tensor_split: tuple[float, ...] = ()  # share of the offloaded layers per device, when several
    from_disk: bool = False  # weights do not fit in RAM: they are paged in through mmap
    experts_last: bool = False  # n_cpu_moe counts the last layers, not the first

    def describe(self, n_layer: int) -> str:
        """A short label for people: 'GPU, experts of 12 layers in RAM'."""
        if not self.devices or (self.n_gpu_layers == 0 and not self.tensor_overrides):
            return "CPU only" + (", from disk" if self.from_disk else "")
        n_gpu = sum(not d.startswith("rpc") for d in self.devices)
        n_rpc = len(self.devices) - n_gpu
        parts = [("GPU" if n_gpu == 1 else f"{n_gpu} GPUs") if n_gpu else "",
                 ("worker" if n_rpc == 1 else f"{n_rpc} workers") if n_rpc else ""]
        where = " + ".join(p for p in parts if p)
        every = self.n_gpu_layers >= n_layer + 1
        if self.tensor_overrides and not self.n_cpu_moe:  # -ot as given
            n = len(self.tensor_overrides)
            base = f"all on {where}" if every else f"{self.repeating_on_gpu(n_layer)}/{n_layer} layers on {where}"
            return f"{base}, {n} -ot override{'s' if n > 1 else ''}"
        if self.n_cpu_moe and every and self.experts_last:
            return f"{where}, experts of the last {self.n_cpu_moe} layers in RAM"
        if self.n_cpu_moe and every:
            return f"{where}, experts of {self.n_cpu_moe} layers in RAM"
        if self.n_cpu_moe:
            return f"{self.repeating_on_gpu(n_layer)}/{n_layer} layers on {where}, all experts in RAM"
        return f"all on {where}" if every else f"{self.repeating_on_gpu(n_layer)}/{n_layer} layers on {where}"

    def repeating_on_gpu(self, n_layer: int) -> int:
        """Repeating layers offloaded: -ngl counts the output head first."""
        return max(0, min(self.n_gpu_layers, n_layer + 1) - 1) if self.devices else 0


@dataclass(frozen=True)
class RunOptions:
    """Context and compute settings the memory model depends on."""

    n_ctx: int = 4096
    n_ubatch: int = 512
    n_batch: int = 2048
    n_seq: int = 1
    kv_type: str = "f16"
    flash_attn: bool = True  # llama.cpp's "auto" turns it on wherever the backend has it
    n_threads: int | None = None
    # Sliding-window layers cache only the window (plus a batch), as llama-server does; True caches
    # the whole context there too (llama.cpp's library default), which context shifting needs.
    swa_full: bool = False


@dataclass(frozen=True)
class DeviceMemory:
    """Bytes one device needs for a plan."""

    weights: int = 0
    kv: int = 0
    compute: int = 0
    output: int = 0
    overhead: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.compute + self.output + self.overhead

    def to_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


@dataclass(frozen=True)
class Prediction:
    decode_tps: float
    prefill_tps: float
    # how sure: the range decode speed should fall in, and what the figures rest on (speed.py)
    decode_low: float = 0.0
    decode_high: float = 0.0
    basis: str = ""


@dataclass(frozen=True)
class Plan:
    placement: Placement
    options: RunOptions
    memory: Mapping[str, DeviceMemory]
    budget: Mapping[str, int]  # usable bytes per device, margin already taken off
    predicted: Prediction
    fits: bool
    notes: tuple[str, ...] = field(default=())

    def shortfall(self) -> dict[str, int]:
        """Bytes missing per device (only the devices that are short)."""
        return {d: m.total - self.budget.get(d, 0) for d, m in self.memory.items() if m.total > self.budget.get(d, 0)}

    def to_dict(self) -> dict[str, Any]:
        p = self.placement
        return {
            "placement": {
                "n_gpu_layers": p.n_gpu_layers,
                "n_cpu_moe": p.n_cpu_moe,
                "tensor_overrides": [list(o) for o in p.tensor_overrides],
                "devices": list(p.devices),
                "tensor_split": list(p.tensor_split),
                "from_disk": p.from_disk,
                "experts_last": p.experts_last,
            },
            "options": asdict(self.options),
            "memory": {d: m.to_dict() for d, m in self.memory.items()},
            "budget": dict(self.budget),
            "predicted": asdict(self.predicted),
            "fits": self.fits,
            "notes": list(self.notes),
        }
