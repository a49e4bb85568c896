"""The speed model: predicted tokens/s of a placement on a machine. Pure: no I/O, no environment.

Decode is bound by memory reads: each device reads its share of the weights a token uses (all dense
weights, the active share of the routed experts) and its KV cache, one device after another as the
layers run in sequence, plus fixed costs per layer and per hand-off between devices. Prompt
processing is bound by compute. planner.py calls predict() for every placement it prices.
"""

from __future__ import annotations

from dataclasses import dataclass

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
        eff = CPU_BW_EFFICIENCY
        if cal is not None and cal.cpu_decode_eff:
            eff = cal.cpu_decode_eff
        if cal is not None and cal.cpu_prefill_eff:
            flops *= cal.cpu_prefill_eff
        return hw.cpu_bandwidth * eff, flops
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


def predict(summary: ModelSummary, placement: Placement, options: RunOptions, hw: Hardware) -> Prediction:
    """Decode tokens/s from bytes read per token per device; prompt tokens/s from FLOPs."""
    frac = summary.n_expert_used / summary.n_expert if summary.n_expert else 1.0
    read: dict[str, float] = {}
    flops: dict[str, float] = {}
    host_weights_for_gpu = 0.0  # bytes of host-resident weights that prompt batches copy to a GPU
    layer_dev = layout.layer_devices(summary.n_layer, placement)
    expert_dev: dict[int, str] = {}
    tied = not any(t.name == "output.weight" for t in summary.tensors)
    for loc in layout.locate(summary, placement):
        t, dev = loc.tensor, loc.device
        if t.role == "embeddings" and not loc.duplicate:
            if tied and layer_dev[summary.n_layer] == CPU and t.name == "token_embd.weight":
                read[dev] = read.get(dev, 0.0) + t.n_bytes  # the CPU output head reads it whole
                flops[dev] = flops.get(dev, 0.0) + 2 * t.n_params
            continue
        share = frac if t.role == "routed_experts" else 1.0
        read[dev] = read.get(dev, 0.0) + t.n_bytes * share
        flops[dev] = flops.get(dev, 0.0) + 2 * t.n_params * share
        if t.role == "routed_experts" and t.layer is not None:
            expert_dev[t.layer] = dev
        if dev == CPU and placement.devices and t.layer is not None:
            host_weights_for_gpu += t.n_bytes
    depth = min(DECODE_DEPTH, options.n_ctx // 2)
    for il in range(summary.n_layer):
        d = min(depth, summary.sliding_window) if summary.swa_layers[il] else depth
        read[layer_dev[il]] = read.get(layer_dev[il], 0.0) + memory.kv_bytes_per_token(summary, il, options.kv_type) * d
    # decode: every device reads its share, one after another (layers run in sequence)
    t_decode = 0.0
    for dev, nbytes in read.items():
        bw, _ = _device_speed(hw, dev)
        t_decode += nbytes / bw

    def handoffs(n_tokens: int, network_only: bool = False) -> float:
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
            t += hop(out_dev, CPU, summary.n_vocab * 4)
        return t

    t_decode += handoffs(1)
    for il in range(summary.n_layer):
        t_decode += GPU_LAYER_OVERHEAD_S if layer_dev[il] != CPU else CPU_LAYER_OVERHEAD_S
    decode = 1.0 / t_decode if t_decode > 0 else 0.0

    # prompt processing, per ubatch of U tokens: all experts get used, so FLOPs use the active share
    u = max(1, min(options.n_ubatch, options.n_batch))
    t_batch = 0.0
    gpu_devs = [d for d in read if d != CPU]
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
    t_batch += handoffs(u, network_only=True)
    prefill = u / t_batch if t_batch > 0 else 0.0
    return Prediction(decode_tps=round(decode, 2), prefill_tps=round(prefill, 1))


def _predict_from_disk(summary: ModelSummary, plan_memory: DeviceMemory, budget: int, base: Prediction,
                       hw: Hardware) -> Prediction:
    """CPU only, weights larger than RAM: the part that does not stay cached is read from disk."""
    resident = max(0, budget - (plan_memory.total - plan_memory.weights))
    miss = 1.0 - min(1.0, resident / max(plan_memory.weights, 1))
    frac = summary.n_expert_used / summary.n_expert if summary.n_expert else 1.0
    per_token = sum(t.n_bytes * (frac if t.role == "routed_experts" else 1.0) for t in summary.loaded_tensors
                    if t.role != "embeddings")
    t = (1 / base.decode_tps if base.decode_tps else 0) + per_token * miss / hw.disk_bandwidth
    return Prediction(decode_tps=round(1 / t, 3) if t else 0.0, prefill_tps=base.prefill_tps)
