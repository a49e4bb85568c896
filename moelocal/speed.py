"""The speed model: predicted tokens/s of a placement on a machine. Pure: no I/O, no environment.

Decode is bound by memory reads: each device reads its share of the weights a token uses (all dense
weights, the active share of the routed experts) and its KV cache, one device after another as the
layers run in sequence, plus fixed costs per layer and per hand-off between devices. Prompt
processing is bound by compute. planner.py calls predict() for every placement it prices.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from moelocal import layout, memory
from moelocal.gguf_model import ModelSummary
from moelocal.hardware import Hardware
from moelocal.plan import CPU, DeviceMemory, Placement, Prediction, RunOptions

# Speed model constants (documented in the README's "How fit predicts speed").
GPU_BW_EFFICIENCY = 0.75  # share of peak bandwidth decode kernels reach
# The probe reads with every core (hardware.measure_cpu_bandwidth). Fitted together with the per-layer cost
# below on 180-330 MB MoE models (scripts/bench_speed_model.py, 2-core AMD EPYC): 0.70-0.86 of the probe
# with 110-60 us a layer, the two trading off; 0.85 and 90 us predicted each decode within 12%.
CPU_BW_EFFICIENCY = 0.85
GPU_FLOPS_EFFICIENCY = 0.35  # quantized matmuls at prompt-processing batch sizes
HOP_LATENCY_S = 20e-6  # one GPU<->CPU hand-off of activations (sync + small copy)
# One hand-off to or from a worker's device, besides the bytes (hardware.network_bandwidth): llama.cpp's
# RPC client sends the inputs and the graph, runs it and reads the result back. Measured on loopback
# (test models, llama-cpp-python 0.3.36): 0.34 ms per hand-off; a LAN adds its round trips.
NET_HOP_LATENCY_S = 400e-6
GPU_LAYER_OVERHEAD_S = 25e-6  # kernel launches per layer per token
# Per layer per token on the CPU besides reading weights (the small ops between the matmuls, their thread
# barriers, the routing): 60-110 us on the models above (8 and 24 layers), 50-100 us on the tiny test
# models whose weights stay in cache, about as much with one thread as with two (15 us made decode 1.2-1.5x
# optimistic here).
CPU_LAYER_OVERHEAD_S = 90e-6
# A rated RAM figure (--cpu-bw: spec sheet, MT/s x 8 bytes x channels) is turned into what llama.cpp's
# CPU decode achieves: CPU_RATED_EFFICIENCY of it, and less on many-channel machines, whose cores cannot
# use all of it (a harmonic mean with CPU_SATURATION_BW): 58% of a dual-channel DDR4-3600's 57.6 GB/s or
# DDR5-4000's 64 GB/s, 52% of DDR5-6000's 96 GB/s, 41% of an 8-channel DDR4-3200 workstation's 205 GB/s,
# 27% of a 12-channel DDR5-4800 server's 460 GB/s. Fitted, with CPU_LAYER_OVERHEAD_S and the split-layer
# cost below, on the published runs in tests/data/published_speeds.json (each machine weighted alike);
# those runs alone leave efficiency and per-layer costs trading off (0.6 with ~0 us to 0.85 with ~400 us),
# so efficiency stays near what bandwidth probes of such machines read and the per-layer cost at this
# machine's measured 90 us.
CPU_RATED_EFFICIENCY = 0.70
CPU_SATURATION_BW = 200e9
# A layer whose attention is on a GPU and experts in RAM: the CPU runs the expert ops (their thread
# barriers, waking the threads while the GPU works), besides the two hand-offs (HOP_LATENCY_S each).
CPU_MOE_LAYER_OVERHEAD_S = 75e-6
# ... and more on a many-channel workstation or server described by its rated RAM figure: each such layer is a
# graph split that starts and joins llama.cpp's CPU threads, and a box with N memory channels runs some 4-8 N
# cores over several dies, whose wake-ups and barriers cost more as there are more of them. Taken as proportional
# to the rated figure above a desktop's (quad-channel DDR4 or dual-channel DDR5 at SPLIT_REFERENCE_BW): 75 us a
# layer there, ~150 us on an 8-channel DDR4-3200 Threadripper, ~350 us on a 12-channel DDR5-4800 EPYC. That is
# how a few GPU layers can make such a box slower than the CPU alone (per layer, more than the GPU saves).
# Measured: RTX 4080 + 8-channel DDR4-3200, gpt-oss-120b with every expert on the CPU, 40 ms a token against
# the 31 ms that 75 us a layer predicts (ik_llama.cpp PR 829). The probe path (this machine) keeps 75 us.
SPLIT_REFERENCE_BW = 100e9
DECODE_DEPTH = 1024  # decode speed is predicted at this many tokens of context (or n_ctx/2)
# Prompt processing: llama.cpp computes weights that live in host memory on the GPU (copying them
# over PCIe each batch) once the batch has at least this many tokens.
OP_OFFLOAD_MIN_BATCH = 32


@dataclass(frozen=True)
class Calibration:
    """What measurements on one machine say about its devices, as factors on the model's own
    figures (None: not measured, the model's default stands). ``runs``: how many measurements;
    ``source``: where they came from, for people ("moelocal bench, 2026-12-01")."""

    cpu_decode_eff: float | None = None  # achieved / Hardware.cpu_bandwidth in decode (replaces the default)
    cpu_prefill_eff: float | None = None  # measured / uncalibrated predicted CPU prompt FLOP/s (a factor)
    gpu_decode_eff: float | None = None  # achieved / rated GPU bandwidth in decode (replaces the default)
    gpu_prefill_eff: float | None = None  # measured / uncalibrated predicted GPU prompt FLOP/s (a factor)
    runs: int = 0
    source: str = ""


# ---- the model -----------------------------------------------------------------------------


def _device_speed(hw: Hardware, device: str, threads: int | None = None) -> tuple[float, float]:
    """(effective bandwidth bytes/s, effective FLOP/s) of a device; ``threads``: llama.cpp's CPU
    threads (None: one per physical core, its default)."""
    cal = hw.calibration
    if device == CPU:
        flops = max(hw.cpu_flops, 1e9)
        if threads and hw.cpu_cores > 0:
            # cpu_flops is one thread per physical core; fewer threads compute proportionally less
            # (measured 1.6-1.9x from one thread to two); more threads than cores gain nothing
            flops *= min(threads, hw.cpu_cores) / hw.cpu_cores
        if cal is not None and cal.cpu_prefill_eff:
            flops *= cal.cpu_prefill_eff
        return cpu_decode_bandwidth(hw), flops
    g = hw.gpu_named(device)
    eff, flops = GPU_BW_EFFICIENCY, g.tflops * GPU_FLOPS_EFFICIENCY
    if cal is not None and cal.gpu_decode_eff and not g.remote:
        eff = cal.gpu_decode_eff
    if cal is not None and cal.gpu_prefill_eff and not g.remote:
        flops *= cal.gpu_prefill_eff
    return g.bandwidth * eff, flops


def _remote(hw: Hardware, device: str) -> bool:
    return device != CPU and hw.gpu_named(device).remote


def _hop_seconds(hw: Hardware, a: str, b: str, nbytes: float) -> float:
    """One hand-off of ``nbytes`` of activations from device ``a`` to ``b``: over the network when
    either is a worker's, else over PCIe."""
    if _remote(hw, a) or _remote(hw, b):
        return NET_HOP_LATENCY_S + nbytes / hw.network_bandwidth
    return HOP_LATENCY_S + nbytes / hw.pcie_bandwidth


# What a decoded token's time is spent on (the keys of decode_parts): reading each kind of bytes,
# the fixed work per layer, and the hand-offs between devices.
EXPERTS, WEIGHTS, KV, LAYERS, HANDOFFS = "routed experts", "weights", "KV cache", "per-layer work", "hand-offs"


def cpu_decode_bandwidth(hw: Hardware) -> float:
    """Bytes/s llama.cpp's CPU decode reads at: calibrated, or the probe's figure times
    CPU_BW_EFFICIENCY, or, for a rated figure (--cpu-bw), what such machines achieve of it."""
    cal = hw.calibration
    if cal is not None and cal.cpu_decode_eff:
        return hw.cpu_bandwidth * cal.cpu_decode_eff
    if hw.cpu_bw_rated:
        achieved = hw.cpu_bandwidth * CPU_RATED_EFFICIENCY
        return achieved / (1 + achieved / CPU_SATURATION_BW)
    return hw.cpu_bandwidth * CPU_BW_EFFICIENCY


def cpu_split_overhead(hw: Hardware) -> float:
    """Seconds the CPU spends per layer whose experts it runs for a GPU (besides the reads): CPU_MOE_LAYER_OVERHEAD_S,
    scaled up on a many-channel machine given by its rated RAM figure (see SPLIT_REFERENCE_BW)."""
    cal = hw.calibration
    if hw.cpu_bw_rated and not (cal is not None and cal.cpu_decode_eff):
        return CPU_MOE_LAYER_OVERHEAD_S * max(1.0, hw.cpu_bandwidth / SPLIT_REFERENCE_BW)
    return CPU_MOE_LAYER_OVERHEAD_S


def _basis(hw: Hardware, device: str) -> str:
    """What a device's decode figures rest on: 'calibrated', 'measured' (the RAM probe) or 'rated'."""
    cal = hw.calibration
    if device == CPU:
        if cal is not None and cal.cpu_decode_eff:
            return "calibrated"
        return "rated" if hw.cpu_bw_rated else "measured"
    if cal is not None and cal.gpu_decode_eff and not hw.gpu_named(device).remote:
        return "calibrated"
    return "rated"


def decode_parts(summary: ModelSummary, placement: Placement, options: RunOptions, hw: Hardware,
                 n_seq: int = 1) -> dict[tuple[str, str], float]:
    """Seconds one decode step spends on each (device, part): reading the routed experts, the other
    weights and the KV cache at each device's decode bandwidth, the fixed work per layer, and the
    hand-offs. ``n_seq`` sequences decoded together read the dense weights once, the union of the
    experts their tokens pick (E * (1 - (1 - k/E)^N) per layer, routing taken as uniform) and each
    its own KV cache; on a device where N tokens' FLOPs take longer than the reads, compute bounds."""
    n_seq = max(1, n_seq)
    k, e = summary.n_expert_used, summary.n_expert
    frac = (1 - (1 - k / e) ** n_seq) if e else 1.0  # share of each layer's experts read in a step
    active = k / e if e else 1.0
    parts: dict[tuple[str, str], float] = {}
    flops: dict[str, float] = {}  # per token
    layer_dev = layout.layer_devices(summary.n_layer, placement)
    expert_dev: dict[int, str] = {}
    tied = not any(t.name == "output.weight" for t in summary.tensors)

    def add(dev: str, what: str, seconds: float) -> None:
        parts[(dev, what)] = parts.get((dev, what), 0.0) + seconds

    bw = {dev: (cpu_decode_bandwidth(hw) if dev == CPU else _device_speed(hw, dev)[0])
          for dev in {CPU, *placement.devices}}
    for loc in layout.locate(summary, placement):
        t, dev = loc.tensor, loc.device
        if t.role == "embeddings" and not loc.duplicate:
            if tied and layer_dev[summary.n_layer] == CPU and t.name == "token_embd.weight":
                add(dev, WEIGHTS, t.n_bytes / bw[dev])  # the CPU output head reads it whole
                flops[dev] = flops.get(dev, 0.0) + 2 * t.n_params
            continue
        if t.role == "routed_experts":
            add(dev, EXPERTS, t.n_bytes * frac / bw[dev])
            flops[dev] = flops.get(dev, 0.0) + 2 * t.n_params * active
            if t.layer is not None:
                expert_dev[t.layer] = dev
        else:
            add(dev, WEIGHTS, t.n_bytes / bw[dev])
            flops[dev] = flops.get(dev, 0.0) + 2 * t.n_params
    depth = min(DECODE_DEPTH, options.n_ctx // 2)
    for il in range(summary.n_layer):
        d = min(depth, summary.sliding_window) if summary.swa_layers[il] else depth
        dev = layer_dev[il]
        add(dev, KV, n_seq * memory.kv_bytes_per_token(summary, il, options.kv_type) * d / bw[dev])
    if n_seq > 1:  # N tokens' matrix-vector products: bound by compute where that is slower than the reads
        for dev, f in flops.items():
            reads = sum(v for (d, what), v in parts.items() if d == dev)
            compute = n_seq * f / _device_speed(hw, dev, options.n_threads)[1]
            if compute > reads:
                add(dev, WEIGHTS, compute - reads)
    split_overhead = cpu_split_overhead(hw)
    for il in range(summary.n_layer):
        dev, e_dev = layer_dev[il], expert_dev.get(il, layer_dev[il])
        add(dev, LAYERS, GPU_LAYER_OVERHEAD_S if dev != CPU else CPU_LAYER_OVERHEAD_S)
        if e_dev == CPU and dev != CPU:  # the experts' ops run on the CPU between two hand-offs
            add(CPU, LAYERS, split_overhead)
    handoffs = _handoffs(summary, layer_dev, expert_dev, hw, n_seq)
    if handoffs:
        parts[("", HANDOFFS)] = handoffs
    return parts


def _handoffs(summary: ModelSummary, layer_dev: list[str], expert_dev: dict[int, str], hw: Hardware,
              n_tokens: int, network_only: bool = False) -> float:
    """Seconds of activation hand-offs between devices for a batch of n_tokens."""
    act = summary.n_embd * 4 * n_tokens  # f32 activations

    def hop(a: str, b: str, nbytes: float) -> float:
        if a == b or (network_only and not (_remote(hw, a) or _remote(hw, b))):
            return 0.0
        return _hop_seconds(hw, a, b, nbytes)

    t, prev = 0.0, CPU  # the input embeddings are on the CPU
    for il in range(summary.n_layer):
        cur, e = layer_dev[il], expert_dev.get(il, layer_dev[il])
        t += hop(prev, cur, act) + hop(cur, e, act) + hop(e, cur, act)
        prev = cur
    out_dev = layer_dev[summary.n_layer]
    t += hop(prev, out_dev, act)
    if _remote(hw, out_dev):  # the logits come back over the network
        t += hop(out_dev, CPU, summary.n_vocab * 4 * n_tokens)
    return t


# How far each part of a prediction may be off, as (fastest, slowest) factors on its seconds, by what
# it rests on. A rated RAM figure: llama.cpp's CPU decode reaches 40-85% of it on desktops (tuned
# dual-channel DDR5 at the top, older or Windows boxes at the bottom) against the ~55% assumed; the
# probe measured this machine; a calibration measured llama.cpp itself. GPUs reach 60-85% of theirs.
UNCERTAINTY = {
    ("cpu", "rated"): (0.70, 1.6),  # a dual-channel desktop: 82% to 34% of its rating
    ("cpu", "measured"): (0.85, 1.2),
    ("gpu", "rated"): (GPU_BW_EFFICIENCY / 0.85, GPU_BW_EFFICIENCY / 0.60),
    ("any", "calibrated"): (0.92, 1.08),
    ("fixed", "uncalibrated"): (0.6, 1.8),  # per-layer work and hand-offs
    ("fixed", "calibrated"): (0.8, 1.25),
}


def decode_range(parts: dict[tuple[str, str], float], hw: Hardware) -> tuple[float, float]:
    """(slowest, fastest) tokens/s the parts allow, each part off by its UNCERTAINTY."""
    slow = fast = 0.0
    calibrated = hw.calibration is not None and hw.calibration.runs > 0
    for (dev, what), sec in parts.items():
        if what in (LAYERS, HANDOFFS):
            lo, hi = UNCERTAINTY[("fixed", "calibrated" if calibrated else "uncalibrated")]
        else:
            basis = _basis(hw, dev)
            lo, hi = UNCERTAINTY[("any", "calibrated")] if basis == "calibrated" else \
                UNCERTAINTY[("cpu" if dev == CPU else "gpu", basis)]
        fast += sec * lo
        slow += sec * hi
    return (1 / slow if slow else 0.0), (1 / fast if fast else 0.0)


def basis_text(hw: Hardware, devices: tuple[str, ...] = ()) -> str:
    """What the prediction rests on, for people: 'calibrated on this machine, 3 runs', 'from rated
    bandwidths', or 'from the RAM bandwidth measured here'."""
    cal = hw.calibration
    if cal is not None and cal.runs > 0 and any(_basis(hw, d) == "calibrated" for d in (CPU, *devices)):
        return f"calibrated on this machine, {cal.runs} run{'s' if cal.runs != 1 else ''}"
    if hw.cpu_bw_rated or devices:
        return "from rated bandwidths"
    return "from the RAM bandwidth measured here"


def predict(summary: ModelSummary, placement: Placement, options: RunOptions, hw: Hardware) -> Prediction:
    """Decode tokens/s from bytes read per token per device (with a range); prompt tokens/s from FLOPs."""
    parts = decode_parts(summary, placement, options, hw)
    t_decode = sum(parts.values())
    decode = 1.0 / t_decode if t_decode > 0 else 0.0
    low, high = decode_range(parts, hw)
    prefill = _prefill(summary, placement, options, hw)
    return Prediction(decode_tps=round(decode, 2), prefill_tps=round(prefill, 1), decode_low=round(low, 2),
                      decode_high=round(high, 2), basis=basis_text(hw, placement.devices))


def throughput(summary: ModelSummary, placement: Placement, options: RunOptions, hw: Hardware, n_seq: int) -> float:
    """Aggregate decode tokens/s of ``n_seq`` sequences decoded together (decode_parts)."""
    t = sum(decode_parts(summary, placement, options, hw, n_seq).values())
    return round(n_seq / t, 2) if t > 0 else 0.0


def _prefill(summary: ModelSummary, placement: Placement, options: RunOptions, hw: Hardware) -> float:
    """Prompt tokens/s, per ubatch of U tokens: all experts get used, so FLOPs use the active share."""
    frac = summary.n_expert_used / summary.n_expert if summary.n_expert else 1.0
    flops: dict[str, float] = {}
    host_weights_for_gpu = 0.0  # bytes of host-resident weights that prompt batches copy to a GPU
    layer_dev = layout.layer_devices(summary.n_layer, placement)
    expert_dev: dict[int, str] = {}
    tied = not any(t.name == "output.weight" for t in summary.tensors)
    for loc in layout.locate(summary, placement):
        t, dev = loc.tensor, loc.device
        if t.role == "embeddings" and not loc.duplicate:
            if tied and layer_dev[summary.n_layer] == CPU and t.name == "token_embd.weight":
                flops[dev] = flops.get(dev, 0.0) + 2 * t.n_params
            continue
        share = frac if t.role == "routed_experts" else 1.0
        flops[dev] = flops.get(dev, 0.0) + 2 * t.n_params * share
        if t.role == "routed_experts" and t.layer is not None:
            expert_dev[t.layer] = dev
        if dev == CPU and placement.devices and t.layer is not None:
            host_weights_for_gpu += t.n_bytes
    u = max(1, min(options.n_ubatch, options.n_batch))
    t_batch = 0.0
    gpu_devs = [d for d in dict.fromkeys(layer_dev) if d != CPU]
    local_gpus = [d for d in gpu_devs if not hw.gpu_named(d).remote]  # llama.cpp never offloads ops to RPC
    for dev, f in flops.items():
        if dev == CPU and local_gpus and u >= OP_OFFLOAD_MIN_BATCH:
            # llama.cpp copies host-resident weights to the GPU and computes there
            _, gflops = _device_speed(hw, local_gpus[0])
            t_batch += f * u / gflops + host_weights_for_gpu / hw.pcie_bandwidth
        else:
            _, dflops = _device_speed(hw, dev, options.n_threads)
            t_batch += f * u / dflops
    attn = 4 * summary.n_layer * max(summary.n_head) * summary.head_dim_k * (u / 2) * u
    attn_dev = gpu_devs[0] if gpu_devs else CPU
    t_batch += attn / _device_speed(hw, attn_dev, options.n_threads)[1]
    # hand-offs over PCIe are left out of prompt processing; over a network they count
    t_batch += _handoffs(summary, layer_dev, expert_dev, hw, u, network_only=True)
    return u / t_batch if t_batch > 0 else 0.0


def _predict_from_disk(summary: ModelSummary, plan_memory: DeviceMemory, budget: int, base: Prediction,
                       hw: Hardware) -> Prediction:
    """CPU only, weights larger than RAM: the part that does not stay cached is read from disk."""
    resident = max(0, budget - (plan_memory.total - plan_memory.weights))
    miss = 1.0 - min(1.0, resident / max(plan_memory.weights, 1))
    frac = summary.n_expert_used / summary.n_expert if summary.n_expert else 1.0
    per_token = sum(t.n_bytes * (frac if t.role == "routed_experts" else 1.0) for t in summary.loaded_tensors
                    if t.role != "embeddings")
    t_disk = per_token * miss / hw.disk_bandwidth

    def tps(t_base: float, disk_factor: float) -> float:
        t = t_base + t_disk * disk_factor
        return round(1 / t, 3) if t else 0.0

    def inv(x: float) -> float:
        return 1 / x if x else 0.0

    # a disk's rate under mmap page faults varies by more than any RAM: half to twice the figure
    return Prediction(decode_tps=tps(inv(base.decode_tps), 1.0), prefill_tps=base.prefill_tps,
                      decode_low=tps(inv(base.decode_low or base.decode_tps), 2.0),
                      decode_high=tps(inv(base.decode_high or base.decode_tps), 0.5),
                      basis=base.basis + ("; " if base.basis else "") + "paging from disk")


# ---- calibration -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Measured:
    """One measured run on this machine: what ran, how, and the tokens/s llama.cpp reached."""

    summary: ModelSummary
    placement: Placement
    options: RunOptions
    decode_tps: float | None = None
    prefill_tps: float | None = None


def calibrate(runs: Sequence[Measured], hw: Hardware, source: str = "") -> Calibration:
    """The factors that make the model's predictions match ``runs`` on ``hw`` (its own calibration ignored).

    Decode: each run's measured time less the fixed costs is what the reads took; the device that reads
    the larger share takes the difference (the other one at its default), giving its achieved / nominal
    bandwidth. Prompt: measured / predicted, for the CPU on CPU-only runs and for the GPU otherwise.
    Several runs combine by their geometric mean, so one odd run moves a factor only so far."""
    base = replace(hw, calibration=None)
    # Only the runs at the shortest context: a filled context adds attention work that the model prices
    # as KV reads alone, and would drag the bandwidth factors down for every other context (measured
    # here: the test models decode 3-5x slower at 2k tokens than empty, where the model says 1.2x).
    dec_ctx = min((r.options.n_ctx for r in runs if r.decode_tps), default=0)
    pre_ctx = min((r.options.n_ctx for r in runs if r.prefill_tps), default=0)
    runs = [r for r in runs if (r.decode_tps and r.options.n_ctx == dec_ctx)
            or (r.prefill_tps and r.options.n_ctx == pre_ctx)]
    cpu_dec: list[float] = []
    gpu_dec: list[float] = []
    cpu_pre: list[float] = []
    gpu_pre: list[float] = []
    for run in runs:
        parts = decode_parts(run.summary, run.placement, run.options, base)
        fixed = sum(v for (_, what), v in parts.items() if what in (LAYERS, HANDOFFS))
        cpu = sum(v for (dev, what), v in parts.items() if dev == CPU and what not in (LAYERS, HANDOFFS))
        gpu = sum(v for (dev, what), v in parts.items() if dev not in (CPU, "") and what not in (LAYERS, HANDOFFS))
        if run.decode_tps and run.decode_tps > 0 and cpu + gpu > 0 and run.options.n_ctx == dec_ctx:
            t = 1 / run.decode_tps
            if cpu >= gpu:
                took = max(t - fixed - gpu, 0.2 * t)  # never credit the reads with less than a fifth of the time
                cpu_dec.append(cpu_decode_bandwidth(base) / hw.cpu_bandwidth * cpu / took)
            else:
                took = max(t - fixed - cpu, 0.2 * t)
                gpu_dec.append(GPU_BW_EFFICIENCY * gpu / took)
        if run.prefill_tps and run.prefill_tps > 0 and run.options.n_ctx == pre_ctx:
            predicted = _prefill(run.summary, run.placement, run.options, base)
            if predicted > 0:
                (gpu_pre if run.placement.devices else cpu_pre).append(run.prefill_tps / predicted)

    def gmean(xs: list[float]) -> float | None:
        return round(math.exp(sum(math.log(x) for x in xs) / len(xs)), 4) if xs else None

    return Calibration(cpu_decode_eff=gmean(cpu_dec), cpu_prefill_eff=gmean(cpu_pre), gpu_decode_eff=gmean(gpu_dec),
                       gpu_prefill_eff=gmean(gpu_pre), runs=len(runs), source=source)
