"""What this machine has (or the one described by overrides): CPU, RAM, GPUs and their bandwidths.

Detection is the only impure part; everything downstream takes a ``Hardware`` value, so plans for a
24 GB GPU can be made and tested on a laptop without one.
"""

from __future__ import annotations

import json
import os
import platform
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING

from moelocal.errors import HardwareSpecError

if TYPE_CHECKING:
    from moelocal.speed import Calibration

GiB = 1 << 30
GB = 1e9

# Peak memory bandwidth (GB/s) and dense FP16 tensor throughput (TFLOP/s) of GPUs people run models on.
# Matched as lowercase substrings of the NVML / Metal name, longest first.
GPU_TABLE: dict[str, tuple[float, float]] = {
    "h200": (4800, 990),
    "h100 sxm": (3350, 990),
    "h100 nvl": (3900, 835),
    "h100": (2000, 756),
    "gh200": (4000, 990),
    "b200": (8000, 2250),
    "a100-sxm4-80gb": (2039, 312),
    "a100 80gb": (1935, 312),
    "a100": (1555, 312),
    "l40s": (864, 362),
    "l40": (864, 181),
    "l4": (300, 121),
    "a10g": (600, 125),
    "a10": (600, 125),
    "t4": (320, 65),
    "v100": (900, 125),
    "a6000": (768, 155),
    "rtx 6000 ada": (960, 364),
    "rtx pro 6000": (1792, 500),
    "rtx 5090": (1792, 419),
    "rtx 5080": (960, 225),
    "rtx 5070 ti": (896, 176),
    "rtx 5070": (672, 124),
    "rtx 5060 ti": (448, 94),
    "rtx 4090": (1008, 330),
    "rtx 4080 super": (736, 209),
    "rtx 4080": (717, 195),
    "rtx 4070 ti super": (672, 176),
    "rtx 4070 ti": (504, 160),
    "rtx 4070 super": (504, 142),
    "rtx 4070": (504, 117),
    "rtx 4060 ti": (288, 88),
    "rtx 4060": (272, 60),
    "rtx 3090 ti": (1008, 160),
    "rtx 3090": (936, 142),
    "rtx 3080 ti": (912, 136),
    "rtx 3080": (760, 119),
    "rtx 3070": (448, 81),
    "rtx 3060 ti": (448, 65),
    "rtx 3060": (360, 51),
    "rtx 3070 ti": (608, 87),
    "rtx 3050": (224, 36),
    "rtx 2080 ti": (616, 108),
    "rtx 2080 super": (496, 89),
    "rtx 2080": (448, 80),
    "rtx 2070 super": (448, 72),
    "rtx 2070": (448, 60),
    "rtx 2060": (336, 52),
    "quadro rtx 8000": (672, 130),
    "quadro rtx 6000": (672, 130),
    "quadro rtx 5000": (448, 89),
    "quadro rtx 4000": (416, 57),
    "rtx a6000": (768, 155),
    "rtx a5000": (768, 111),
    "rtx a4000": (448, 77),
    "rtx 4000 ada": (360, 107),
    "gtx 1080 ti": (484, 11),
    "gtx 1080": (320, 9),
    "gtx 1070": (256, 6.5),
    "titan rtx": (672, 130),
    "p100": (732, 19),
    "p40": (347, 12),
    "rx 9070 xt": (640, 195),
    "rx 7900 xtx": (960, 123),
    "rx 7900 xt": (800, 103),
    "rx 6900 xt": (512, 46),
    "rx 6800 xt": (512, 41),
    "mi50": (1024, 27),
    "radeon 8060s": (256, 59),  # Ryzen AI Max+ 395 (Strix Halo): 256-bit LPDDR5X-8000 shared with the CPU
    "gb10": (273, 100),  # DGX Spark: 256-bit LPDDR5X-8533 shared with the CPU
    "apple m1 ultra": (800, 21),
    "apple m1 max": (400, 10.6),
    "apple m1 pro": (200, 5.3),
    "apple m1": (68, 2.6),
    "apple m2 ultra": (800, 27),
    "apple m2 max": (400, 13.6),
    "apple m2 pro": (200, 6.8),
    "apple m2": (100, 3.6),
    "apple m3 ultra": (819, 28),
    "apple m3 max": (400, 14),
    "apple m3 pro": (150, 7),
    "apple m3": (100, 4.1),
    "apple m4 max": (546, 17),
    "apple m4 pro": (273, 9),
    "apple m4": (120, 4.3),
}
# Memory (GiB) of the cards `--gpu NAME` describes, where one size is what people mean by the name (the
# common one where there are several: an A100 is its 80 GB card unless named "a100 40gb"). Apple's GPUs share
# RAM, so they need --vram.
GPU_VRAM_GIB: dict[str, float] = {
    "h200": 141, "h100 sxm": 80, "h100 nvl": 94, "h100": 80, "gh200": 96, "b200": 180, "a100-sxm4-80gb": 80,
    "a100 80gb": 80, "a100 40gb": 40, "a100": 80, "l40s": 48, "l40": 48, "l4": 24, "a10g": 24, "a10": 24, "t4": 16,
    "v100": 32, "a6000": 48, "rtx a6000": 48, "rtx a5000": 24, "rtx a4000": 16, "rtx 6000 ada": 48,
    "rtx 4000 ada": 20, "rtx pro 6000": 96, "rtx 5090": 32, "rtx 5080": 16, "rtx 5070 ti": 16, "rtx 5070": 12,
    "rtx 5060 ti": 16, "rtx 4090": 24, "rtx 4080 super": 16, "rtx 4080": 16, "rtx 4070 ti super": 16,
    "rtx 4070 ti": 12, "rtx 4070 super": 12, "rtx 4070": 12, "rtx 4060 ti": 16, "rtx 4060": 8, "rtx 3090 ti": 24,
    "rtx 3090": 24, "rtx 3080 ti": 12, "rtx 3080": 10, "rtx 3070 ti": 8, "rtx 3070": 8, "rtx 3060 ti": 8,
    "rtx 3060": 12, "rtx 3050": 8, "rtx 2080 ti": 11, "rtx 2080 super": 8, "rtx 2080": 8, "rtx 2070 super": 8,
    "rtx 2070": 8, "rtx 2060": 6, "quadro rtx 8000": 48, "quadro rtx 6000": 24, "quadro rtx 5000": 16,
    "quadro rtx 4000": 8, "titan rtx": 24, "gtx 1080 ti": 11, "gtx 1080": 8, "gtx 1070": 8, "p100": 16, "p40": 24,
    "rx 9070 xt": 16, "rx 7900 xtx": 24, "rx 7900 xt": 20, "rx 6900 xt": 16, "rx 6800 xt": 16, "mi50": 32,
}
# A GPU we do not know (or one given only by --vram): a mid-range card. Override with --gpu-bw.
DEFAULT_GPU = (500.0, 80.0)
# PCIe 4.0 x16, what host<->GPU copies of expert weights run at during prompt processing.
DEFAULT_PCIE_BW = 25 * GB
# Effective per-core throughput of llama.cpp's CPU matmuls on quantized weights (GFLOP/s) in prompt
# processing: 42-58 for Q8_0 and 58-76 for Q4_K (repacked) on an AVX-512 Zen 4 (scripts/bench_speed_model.py);
# the middle of that range, so either type lands within about a third of it.
CPU_GFLOPS_PER_CORE = 60.0
# Bumped when measure_cpu_bandwidth changes what it measures, so that cached values are measured again.
PROBE_VERSION = 2
DEFAULT_DISK_BW = 2 * GB  # an NVMe SSD reading large pages sequentially
# The link to RPC workers: gigabit Ethernet. Override with --net-bw (10GbE: 1.25GB/s).
DEFAULT_NET_BW = 1e9 / 8


def default_threads() -> int:
    """llama.cpp's own default thread count: one thread per physical core."""
    try:
        import psutil

        n = psutil.cpu_count(logical=False)
    except Exception:
        n = None
    return max(1, n or os.cpu_count() or 1)


@dataclass(frozen=True)
class WorkerDevice:
    """One device an RPC worker serves, with the memory it reports."""

    free: int
    total: int


@dataclass(frozen=True)
class WorkerInfo:
    """What an RPC worker said about itself (rpc.probe asks; with_workers adds its devices)."""

    endpoint: str  # host:port as given (llama.cpp names buffers after it)
    devices: tuple[WorkerDevice, ...]
    version: tuple[int, int, int]


@dataclass(frozen=True)
class GPU:
    name: str
    total: int
    free: int
    bandwidth: float  # bytes/s
    tflops: float
    backend: str = "cuda"  # cuda | metal | rpc | vulkan
    unified: bool = False  # shares system RAM (Apple Silicon)
    endpoint: str = ""  # rpc: the worker's host:port
    remote_index: int = 0  # rpc: the device's index on its worker

    @property
    def remote(self) -> bool:
        """A device on another machine, reached over the network through llama.cpp's RPC backend."""
        return self.backend == "rpc"


@dataclass(frozen=True)
class Hardware:
    cpu_name: str
    cpu_cores: int  # physical cores: llama.cpp's default thread count
    ram_total: int
    ram_available: int
    cpu_bandwidth: float  # bytes/s
    gpus: tuple[GPU, ...] = ()
    cpu_flops: float = 0.0  # FLOP/s for quantized matmuls on all cores
    pcie_bandwidth: float = DEFAULT_PCIE_BW
    disk_bandwidth: float = DEFAULT_DISK_BW
    has_amx: bool = False
    overridden: tuple[str, ...] = field(default=())  # which values came from the user
    network_bandwidth: float = DEFAULT_NET_BW  # to the workers (bytes/s)
    # cpu_bandwidth is a spec-sheet figure (--cpu-bw, or a machine described in code) rather than what the
    # probe read here (detect() says so): the speed model turns a rating into achieved bandwidth itself
    # (speed.cpu_decode_bandwidth)
    cpu_bw_rated: bool = True
    calibration: Calibration | None = None  # measured on this machine (moelocal bench); None: the defaults

    @property
    def unified(self) -> bool:
        return any(g.unified for g in self.gpus)

    @property
    def gpu_names(self) -> tuple[str, ...]:
        """The plan's name for each of ``gpus``: gpu0, gpu1 ... for local GPUs, rpc0, rpc1 ... for
        the workers' devices (each counted in its own order)."""
        out, n_local, n_remote = [], 0, 0
        for g in self.gpus:
            if g.remote:
                out.append(f"rpc{n_remote}")
                n_remote += 1
            else:
                out.append(f"gpu{n_local}")
                n_local += 1
        return tuple(out)

    def gpu_named(self, name: str) -> GPU:
        """The GPU a plan device name (gpuN, rpcN) stands for."""
        return self.gpus[self.gpu_names.index(name)]

    @property
    def workers(self) -> tuple[str, ...]:
        """The workers' endpoints, in the order their devices were added."""
        return tuple(dict.fromkeys(g.endpoint for g in self.gpus if g.remote))

    def to_dict(self) -> dict:
        return {
            "cpu": {
                "name": self.cpu_name,
                "cores": self.cpu_cores,
                "bandwidth": self.cpu_bandwidth,
                "flops": self.cpu_flops,
                "amx": self.has_amx,
                "bandwidth_rated": self.cpu_bw_rated,  # a spec-sheet figure (--cpu-bw), not the probe's
            },
            "ram": {"total": self.ram_total, "available": self.ram_available},
            "gpus": [
                {
                    "name": g.name,
                    "total": g.total,
                    "free": g.free,
                    "bandwidth": g.bandwidth,
                    "tflops": g.tflops,
                    "backend": g.backend,
                    "unified": g.unified,
                    **({"endpoint": g.endpoint, "remote_index": g.remote_index} if g.remote else {}),
                }
                for g in self.gpus
            ],
            **({"network_bandwidth": self.network_bandwidth} if any(g.remote for g in self.gpus) else {}),
            "overridden": list(self.overridden),
            **({"calibration": asdict(self.calibration)} if self.calibration is not None else {}),
        }


# ---- parsing user values ---------------------------------------------------------------------

_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1 << 10,
    "ki": 1 << 10,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1 << 20,
    "mi": 1 << 20,
    "g": GiB,  # a bare "24G" means what nvidia-smi and people mean: GiB
    "gb": 1000**3,
    "gib": GiB,
    "gi": GiB,
    "t": 1 << 40,
    "tb": 1000**4,
    "tib": 1 << 40,
    "ti": 1 << 40,
}


def parse_size(text: str, what: str = "size") -> int:
    """'24GiB', '24G', '24 GB', '512MiB', '0' → bytes. A bare number is GiB (``--vram 24``)."""
    m = _SIZE_RE.match(str(text))
    if not m:
        raise HardwareSpecError(f"cannot read {what} {text!r}", "write it like 24GiB, 16GB or 512MiB")
    number, unit = float(m.group(1)), (m.group(2) or "").lower()
    if unit == "":
        return int(number * GiB)
    if unit not in _UNITS:
        raise HardwareSpecError(f"cannot read {what} {text!r}: unknown unit {unit!r}", "use MiB, GiB or GB")
    return int(number * _UNITS[unit])


def parse_bandwidth(text: str, what: str = "bandwidth") -> float:
    """'936GB/s', '936', '0.9TB/s' → bytes/s. A bare number is GB/s."""
    t = str(text).strip().lower().replace(" ", "")
    t = t[:-2] if t.endswith("/s") else t
    m = re.match(r"^([0-9]*\.?[0-9]+)(gb|tb|mb|gib|tib|mib)?$", t)
    if not m:
        raise HardwareSpecError(f"cannot read {what} {text!r}", "write it like 936GB/s or 936")
    scale = {"": GB, "gb": GB, "tb": 1e12, "mb": 1e6, "gib": GiB, "tib": 1 << 40, "mib": 1 << 20}[m.group(2) or ""]
    value = float(m.group(1)) * scale
    if value <= 0:
        raise HardwareSpecError(f"{what} must be positive, got {text!r}")
    return value


def parse_network_bandwidth(text: str, what: str = "--net-bw") -> float:
    """'1Gbit', '10Gbit/s', '100Mbit', or a bandwidth parse_bandwidth reads ('1.25GB/s') → bytes/s."""
    t = str(text).strip().lower().replace(" ", "")
    t = t[:-2] if t.endswith("/s") else t
    m = re.match(r"^([0-9]*\.?[0-9]+)([gm])(bit|bps|b)$", t) if t.endswith(("bit", "bps")) else None
    if m:
        value = float(m.group(1)) * (1e9 if m.group(2) == "g" else 1e6) / 8
        if value <= 0:
            raise HardwareSpecError(f"{what} must be positive, got {text!r}")
        return value
    return parse_bandwidth(text, what)


def _gpu_key(text: str) -> str:
    """A GPU name as the tables spell it: lowercase, single spaces, without the vendor's brand words."""
    words = re.sub(r"[^a-z0-9-]+", " ", text.lower()).split()
    return " ".join(w for w in words if w not in ("nvidia", "geforce", "amd", "radeon", "tesla", "gb", "graphics"))


def _gpu_label(key: str) -> str:
    """'rtx 3070 ti' -> 'RTX 3070 Ti', for people."""
    special = {"ti": "Ti", "super": "SUPER", "ada": "Ada", "pro": "PRO", "quadro": "Quadro", "titan": "TITAN",
               "apple": "Apple", "ultra": "Ultra", "max": "Max", "radeon": "Radeon"}
    return " ".join(special.get(w, w.upper()) for w in key.split())


def lookup_gpu(name: str) -> tuple[str, float, float, int | None]:
    """(label, rated bandwidth bytes/s, FLOP/s, memory bytes or None) of a GPU named the way people name it
    ("RTX 3090", "rtx3090", "NVIDIA GeForce RTX 4090", "3090"); a HardwareSpecError naming the nearest
    names in moelocal's table when it is not there."""
    import difflib

    key = _gpu_key(name)
    key = re.sub(r"\b(rtx|gtx|rx)(\d)", r"\1 \2", key)  # "rtx3090" -> "rtx 3090"
    key = re.sub(r"(\d)(ti|super|xtx|xt)\b", r"\1 \2", key)  # "3070ti" -> "3070 ti"
    candidates = [k for k in (key, f"rtx {key}", f"gtx {key}", f"rx {key}", f"radeon {key}") if k in GPU_TABLE]
    if not candidates:
        near = difflib.get_close_matches(key, list(GPU_TABLE), n=3, cutoff=0.5)
        hint = ("nearest: " + ", ".join(_gpu_label(n) for n in near)) if near else \
            "give its memory and bandwidth instead: --vram 24GiB --gpu-bw 936GB/s"
        raise HardwareSpecError(f"unknown GPU {name!r} for --gpu", hint)
    k = candidates[0]
    bw, tf = GPU_TABLE[k]
    vram = GPU_VRAM_GIB.get(k)
    return _gpu_label(k), bw * GB, tf * 1e12, int(vram * GiB) if vram else None


_DDR_RE = re.compile(r"^(?:(lp)?ddr([2-6])x?)?-?(\d{3,5})(?:mt/?s|mhz)?(?:x(\d{1,2}))?$")


def parse_ram_bandwidth(text: str, what: str = "--cpu-bw") -> float:
    """RAM bandwidth from a spec ('DDR5-6000x2': MT/s x 8 bytes x channels; 'DDR4-3200' is dual channel)
    or a rated figure ('96GB/s', '96')."""
    t = str(text).strip().lower().replace(" ", "").replace("_", "-")
    m = _DDR_RE.match(t)
    if m and (m.group(2) or "x" in t or "mt" in t or "mhz" in t):
        mts, channels = int(m.group(3)), int(m.group(4) or 2)
        if not 200 <= mts <= 20000 or not 1 <= channels <= 24:
            raise HardwareSpecError(f"cannot read {what} {text!r}: {mts} MT/s x {channels} channels",
                                    "write it like DDR5-6000x2 (MT/s x channels) or 96GB/s")
        return mts * 1e6 * 8 * channels
    try:
        return parse_bandwidth(text, what)
    except HardwareSpecError:
        raise HardwareSpecError(f"cannot read {what} {text!r}",
                                "write it like DDR5-6000x2 (MT/s x 64-bit channels), DDR4-3200x4 or 96GB/s") from None


def gpu_specs(name: str) -> tuple[float, float]:
    """(bandwidth bytes/s, FLOP/s) for a GPU name, from the table or the default."""
    lower = name.lower()
    for key in sorted(GPU_TABLE, key=len, reverse=True):
        if key in lower:
            bw, tf = GPU_TABLE[key]
            return bw * GB, tf * 1e12
    return DEFAULT_GPU[0] * GB, DEFAULT_GPU[1] * 1e12


# ---- overrides -------------------------------------------------------------------------------


def with_overrides(
    hw: Hardware,
    *,
    gpu: list[str] | None = None,
    vram: list[str] | None = None,
    ram: str | None = None,
    no_gpu: bool = False,
    gpu_bw: str | None = None,
    cpu_bw: str | None = None,
) -> Hardware:
    """Describe another machine: replace the detected values with the user's.

    ``gpu``: cards by name (moelocal's table gives their memory and rated bandwidth; repeat or
    comma-separate), whose memory --vram may still set. Bandwidths are rated figures: ``cpu_bw`` a RAM
    spec (DDR5-6000x2) or GB/s figure, marked rated so that the speed model discounts it."""
    changed = list(hw.overridden)
    gpus = hw.gpus
    names = [n.strip() for part in (gpu or ()) for n in str(part).split(",") if n.strip()]
    if names and not no_gpu:
        sizes = [v for part in (vram or ()) for v in str(part).split(",") if v.strip()]
        if len(sizes) > len(names):
            raise HardwareSpecError(f"--vram gives {len(sizes)} sizes for {len(names)} --gpu card(s)",
                                    "give one size per card, in --gpu order, or leave --vram out")
        named = []
        for i, name in enumerate(names):
            label, bw, tf, mem = lookup_gpu(name)
            if i < len(sizes):
                mem = parse_size(sizes[i], "--vram")
            if not mem or mem <= 0:
                raise HardwareSpecError(f"--gpu {name!r} has no fixed memory size", "add --vram for it")
            named.append(GPU(name=label, total=mem, free=mem, bandwidth=bw, tflops=tf))
        gpus = tuple(named)
        changed.append("gpu")
        vram = None
    if no_gpu:
        gpus = ()
        changed.append("no_gpu")
    elif vram:
        sizes = [parse_size(v, "--vram") for part in vram for v in str(part).split(",") if v.strip()]
        new = []
        for i, size in enumerate(sizes):
            if size <= 0:
                raise HardwareSpecError(f"--vram must be positive, got {vram[i] if i < len(vram) else size}")
            base = gpus[i] if i < len(gpus) else None
            if base is not None:
                new.append(replace(base, total=size, free=size))
            else:
                bw, tf = DEFAULT_GPU[0] * GB, DEFAULT_GPU[1] * 1e12
                new.append(GPU(name=f"GPU {i} (--vram)", total=size, free=size, bandwidth=bw, tflops=tf))
        gpus = tuple(new)
        changed.append("vram")
    if gpu_bw:
        bw = parse_bandwidth(gpu_bw, "--gpu-bw")
        gpus = tuple(replace(g, bandwidth=bw) for g in gpus)
        changed.append("gpu_bw")
    out = replace(hw, gpus=gpus)
    if ram:
        size = parse_size(ram, "--ram")
        if size <= 0:
            raise HardwareSpecError(f"--ram must be positive, got {ram!r}")
        out = replace(out, ram_total=size, ram_available=size)
        changed.append("ram")
    if cpu_bw:
        out = replace(out, cpu_bandwidth=parse_ram_bandwidth(cpu_bw, "--cpu-bw"), cpu_bw_rated=True)
        changed.append("cpu_bw")
    return replace(out, overridden=tuple(dict.fromkeys(changed)))


def with_workers(hw: Hardware, workers: Sequence[WorkerInfo], *, mem: Sequence[str] | None = None,
                 net_bw: str | None = None) -> Hardware:
    """Add the workers' devices (as ``rpc.probe`` found them) to ``hw``, after its own GPUs.

    ``mem`` overrides their memory like --vram does for GPUs, one value per worker device in order;
    ``net_bw`` is the network bandwidth to them. A worker's device could be a GPU or a CPU (llama.cpp
    does not say which), so its speed is a mid-range GPU's until --gpu-bw says otherwise.
    """
    changed = list(hw.overridden)
    sizes = [parse_size(v, "--worker-mem") for part in (mem or ()) for v in str(part).split(",") if v.strip()]
    n_devices = sum(len(w.devices) for w in workers)
    if len(sizes) > n_devices:
        raise HardwareSpecError(f"--worker-mem gives {len(sizes)} sizes for {n_devices} worker device(s)",
                                "give one size per worker device, in --worker order")
    if any(size <= 0 for size in sizes):
        raise HardwareSpecError("--worker-mem must be positive")
    bw, tf = DEFAULT_GPU[0] * GB, DEFAULT_GPU[1] * 1e12
    added = []
    for w in workers:
        for i, d in enumerate(w.devices):
            free, total = d.free, d.total
            if len(added) < len(sizes):
                free = total = sizes[len(added)]
            added.append(GPU(name=f"worker {w.endpoint} #{i}", total=total, free=free, bandwidth=bw, tflops=tf,
                             backend="rpc", endpoint=w.endpoint, remote_index=i))
    if sizes:
        changed.append("worker_mem")
    out = replace(hw, gpus=hw.gpus + tuple(added))
    if net_bw:
        out = replace(out, network_bandwidth=parse_network_bandwidth(net_bw, "--net-bw"))
        changed.append("net_bw")
    return replace(out, overridden=tuple(dict.fromkeys(changed)))


def usable_by_llama(hw: Hardware, llama_gpus: int, gpu_backends: Sequence[str] = (),
                    why: str = "") -> tuple[Hardware, str | None]:
    """``hw`` with only the local GPUs llama.cpp can use, and one line for people when that is not all
    of them, or when a GPU build finds none (None when all is as detected).

    ``llama_gpus``: how many GPU devices llama.cpp registered; ``gpu_backends``: the GPU backends it was
    built with (CUDA, Metal ...; none for a CPU build); ``why``: what llama.cpp said, if anything. A CUDA
    build on a machine without a usable driver registers no GPU: the plan is then the CPU's, as
    llama.cpp itself would run it, instead of one that names a GPU it cannot reach.
    """
    local = [i for i, g in enumerate(hw.gpus) if not g.remote]
    built = "/".join(gpu_backends)
    reason = f" ({why})" if why else ""
    if llama_gpus >= len(local):
        if not local and gpu_backends and llama_gpus == 0:
            return hw, f"llama.cpp is built for {built} but finds no usable GPU{reason}: running on the CPU"
        return hw, None
    keep = set(local[:llama_gpus])
    out = replace(hw, gpus=tuple(g for i, g in enumerate(hw.gpus) if g.remote or i in keep))
    where = "planning and running on the CPU" if llama_gpus == 0 else f"using the first {llama_gpus}"
    if not gpu_backends:
        return out, (f"this llama-cpp-python is a CPU-only build: the {len(local)} GPU(s) here go unused, {where} "
                     "(reinstall it with scripts/install.sh --backend cuda to use them)")
    return out, f"llama.cpp ({built}) can use {llama_gpus} of the {len(local)} GPU(s) here{reason}: {where}"


# ---- detection -------------------------------------------------------------------------------


def detect(probe: bool = True) -> Hardware:
    """This machine, as far as can be seen without loading llama.cpp."""
    import psutil

    vm = psutil.virtual_memory()
    cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    name, flags = _cpu_info()
    gpus = _nvidia_gpus() or _apple_gpus(vm.total)
    bw = cpu_bandwidth(name) if probe else 20 * GB
    hw = Hardware(
        cpu_name=name,
        cpu_cores=cores,
        ram_total=vm.total,
        ram_available=vm.available,
        cpu_bandwidth=bw,
        gpus=tuple(gpus),
        cpu_flops=cores * CPU_GFLOPS_PER_CORE * 1e9,
        has_amx="amx_tile" in flags or "amx_int8" in flags,
        cpu_bw_rated=not probe,  # the probe measured what this machine reads; without it, a guess
    )
    if not probe:  # a stand-in bandwidth: factors measured against the probe's would not apply
        return hw
    from moelocal import calibration  # this machine's measured speeds (moelocal bench, runs)

    return calibration.attach(hw)


def _cpu_info() -> tuple[str, set[str]]:
    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("model name") and ":" in line:
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and ":" in line:
                    flags = set(line.split(":", 1)[1].split())
                if flags and name:
                    break
    except OSError:
        pass
    if platform.system() == "Darwin":
        import subprocess

        try:
            name = subprocess.run(
                ["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, timeout=2
            ).stdout.strip() or name
        except (OSError, subprocess.SubprocessError):
            pass
    return name, flags


def _nvidia_gpus() -> list[GPU]:
    """NVIDIA GPUs through NVML (nvidia-ml-py); an empty list without a driver."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except Exception:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...: no NVIDIA GPU here
        return []
    gpus = []
    try:
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            name = name.decode() if isinstance(name, bytes) else name
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            bw, tf = gpu_specs(name)
            gpus.append(GPU(name=name, total=int(mem.total), free=int(mem.free), bandwidth=bw, tflops=tf))
    except Exception:
        return gpus
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass
    return gpus


def _apple_gpus(ram_total: int) -> list[GPU]:
    """Apple Silicon: the GPU shares RAM; Metal lets it wire about 2/3 (<= 36 GiB) or 3/4 of it."""
    if platform.system() != "Darwin" or platform.machine() != "arm64":
        return []
    name, _ = _cpu_info()
    limit = ram_total * 2 // 3 if ram_total <= 36 * GiB else ram_total * 3 // 4
    bw, tf = gpu_specs(name if name.lower().startswith("apple") else f"apple {name}")
    return [GPU(name=f"{name} GPU", total=limit, free=limit, bandwidth=bw, tflops=tf, backend="metal", unified=True)]


def cpu_bandwidth(cpu_name: str) -> float:
    """Memory read bandwidth of this CPU, measured once (about 0.2 s) and cached per CPU model."""
    from moelocal import config

    path = config.cache_dir("probe") / "cpu_bandwidth.json"
    try:
        cached = json.loads(path.read_text())
        # a value from an older probe measured something else (one thread): measure again
        if cached.get("cpu") == cpu_name and cached.get("probe") == PROBE_VERSION and cached.get("bandwidth", 0) > 0:
            return float(cached["bandwidth"])
    except (OSError, ValueError):
        pass
    value = measure_cpu_bandwidth()
    try:
        path.write_text(json.dumps({"cpu": cpu_name, "bandwidth": value, "probe": PROBE_VERSION, "when": time.time()}))
    except OSError:
        pass
    return value


def measure_cpu_bandwidth(size: int = 256 << 20, repeats: int = 3, threads: int | None = None) -> float:
    """Bytes/s that reductions over large arrays read with one thread per physical core (llama.cpp's
    default thread count), best of a few runs. numpy releases the GIL while it fills and sums."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    import psutil

    n = max(1, threads or psutil.cpu_count(logical=False) or os.cpu_count() or 1)
    # at least 32 MiB a thread: many threads' shares must still outgrow the caches they share
    per = max(size // n, 32 << 20) // 8
    best = float("inf")
    with ThreadPoolExecutor(n) as pool:
        parts = list(pool.map(lambda _: np.ones(per, dtype=np.float64), range(n)))  # page faults in parallel too
        for _ in range(repeats):
            t = time.perf_counter()
            list(pool.map(np.sum, parts))
            best = min(best, time.perf_counter() - t)
    return n * per * 8 / best
