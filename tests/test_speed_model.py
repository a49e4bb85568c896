"""The speed model's behaviour: which way a prediction moves, and by how much, when one input changes.

Nothing here times this machine; scripts/bench_speed_model.py compares predictions with measurements.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from synthetic import qwen3moe_summary

from moelocal import config, hardware, layout, memory, speed
from moelocal.hardware import GPU, GiB, Hardware
from moelocal.plan import Placement, RunOptions

OPTS = RunOptions(n_ctx=8192)
CPU_ONLY = Placement()


@pytest.fixture(scope="module")
def q30b():
    return qwen3moe_summary()


def cpu_machine(bw: float = 60e9, flops: float = 8 * 55e9, cores: int = 8) -> Hardware:
    return Hardware(cpu_name="test cpu", cpu_cores=cores, ram_total=256 * GiB, ram_available=256 * GiB,
                    cpu_bandwidth=bw, cpu_flops=flops)


def decode(summary, hw: Hardware, options: RunOptions = OPTS, placement: Placement = CPU_ONLY) -> float:
    return speed.predict(summary, placement, options, hw).decode_tps


def prefill(summary, hw: Hardware, options: RunOptions = OPTS, placement: Placement = CPU_ONLY) -> float:
    return speed.predict(summary, placement, options, hw).prefill_tps


def rounding(*tps: float) -> float:
    """How far apart 1/tps values may be only because decode_tps is rounded to 0.01."""
    return sum(0.005 / t**2 for t in tps)


def read_per_token(summary, options: RunOptions) -> float:
    """Bytes a CPU-only decode reads per token, worked out by hand: every dense weight but the input
    embeddings, n_used/n_expert of the routed experts, and the KV cache at the predicted depth."""
    share = summary.n_expert_used / summary.n_expert
    weights = sum(t.n_bytes * (share if t.role == "routed_experts" else 1) for t in summary.tensors
                  if t.name != "token_embd.weight")
    depth = min(speed.DECODE_DEPTH, options.n_ctx // 2)
    kv = sum(memory.kv_bytes_per_token(summary, il, options.kv_type) for il in range(summary.n_layer)) * depth
    return weights + kv


def test_cpu_decode_is_bytes_over_bandwidth_plus_a_cost_per_layer(q30b):
    hw = cpu_machine()
    tps = decode(q30b, hw)
    expected = (read_per_token(q30b, OPTS) / (hw.cpu_bandwidth * speed.CPU_BW_EFFICIENCY)
                + q30b.n_layer * speed.CPU_LAYER_OVERHEAD_S)
    assert abs(1 / tps - expected) <= rounding(tps)


def test_doubling_the_bandwidth_halves_the_time_spent_reading(q30b):
    slow, fast = decode(q30b, cpu_machine(bw=60e9)), decode(q30b, cpu_machine(bw=120e9))
    overhead = q30b.n_layer * speed.CPU_LAYER_OVERHEAD_S
    assert abs((1 / slow - overhead) - 2 * (1 / fast - overhead)) <= 3 * rounding(slow, fast)
    # a 30B MoE model is bandwidth-bound: nearly twice as fast, never more
    assert 1.8 < fast / slow < 2.0


def test_with_unlimited_bandwidth_only_the_per_layer_cost_is_left():
    hw = cpu_machine(bw=1e18)
    deep, shallow = qwen3moe_summary(n_layer=48), qwen3moe_summary(n_layer=24)
    assert decode(deep, hw) == pytest.approx(1 / (48 * speed.CPU_LAYER_OVERHEAD_S), abs=0.01)
    assert decode(shallow, hw) == pytest.approx(2 * decode(deep, hw), abs=0.02)


def test_decode_reads_the_experts_a_token_uses_not_all_of_them():
    hw = cpu_machine()
    many = qwen3moe_summary(n_expert=128, n_used=8)
    few = qwen3moe_summary(n_expert=64, n_used=8)  # half the experts, the same ones per token
    assert many.tensor_bytes > 1.8 * few.tensor_bytes  # 16.4 GiB against 8.8
    # of the experts, a token reads the same bytes in both; only the routers (F32, a row per expert) differ
    a, b = decode(many, hw), decode(few, hw)
    routers = many.n_layer * many.n_embd * (128 - 64) * 4
    assert abs((1 / a - 1 / b) - routers / (hw.cpu_bandwidth * speed.CPU_BW_EFFICIENCY)) <= rounding(a, b)
    assert decode(qwen3moe_summary(n_expert=128, n_used=16), hw) < decode(many, hw)


def test_prefill_is_computed_from_flops_not_bandwidth(q30b):
    base = prefill(q30b, cpu_machine())
    assert prefill(q30b, cpu_machine(flops=2 * 8 * 55e9)) == pytest.approx(2 * base, abs=0.1)
    assert prefill(q30b, cpu_machine(bw=5e9)) == base


def test_fewer_threads_than_cores_compute_proportionally_less(q30b):
    hw = cpu_machine(cores=8)
    default = prefill(q30b, hw)
    assert prefill(q30b, hw, replace(OPTS, n_threads=8)) == default
    assert prefill(q30b, hw, replace(OPTS, n_threads=16)) == default  # more threads than cores gain nothing
    assert prefill(q30b, hw, replace(OPTS, n_threads=2)) == pytest.approx(default / 4, abs=0.1)


def test_the_kv_cache_read_grows_with_context_up_to_the_decode_depth(q30b):
    hw = cpu_machine()
    short, long = decode(q30b, hw, RunOptions(n_ctx=512)), decode(q30b, hw, RunOptions(n_ctx=2048))
    assert short > long
    # 512 tokens: read at depth 256; 2048: at depth 1024; the difference is 768 tokens of K and V
    per_token = sum(memory.kv_bytes_per_token(q30b, il) for il in range(q30b.n_layer))
    extra = 768 * per_token / (hw.cpu_bandwidth * speed.CPU_BW_EFFICIENCY)
    assert abs((1 / long - 1 / short) - extra) <= rounding(short, long)
    # past twice the decode depth the prediction no longer depends on the context
    assert decode(q30b, hw, RunOptions(n_ctx=4096)) == decode(q30b, hw, RunOptions(n_ctx=32768))
    # a q8_0 cache reads about half the bytes of an f16 one
    f16, q8 = RunOptions(n_ctx=32768), RunOptions(n_ctx=32768, kv_type="q8_0", flash_attn=True)
    assert decode(q30b, hw, q8) > decode(q30b, hw, f16)


def test_decode_falls_as_expert_layers_move_to_the_slower_cpu(q30b):
    gpu = GPU(name="test gpu", total=80 * GiB, free=80 * GiB, bandwidth=1000e9, tflops=100e12)
    hw = replace(cpu_machine(), gpus=(gpu,))
    full = q30b.n_layer + 1
    speeds = [decode(q30b, hw, placement=Placement(n_gpu_layers=full, devices=("gpu0",)))]
    for k in range(1, q30b.n_layer + 1):
        placement = Placement(n_gpu_layers=full, n_cpu_moe=k, tensor_overrides=layout.n_cpu_moe_overrides(k),
                              devices=("gpu0",))
        speeds.append(decode(q30b, hw, placement=placement))
    speeds.append(decode(q30b, hw))  # and at last everything on the CPU
    assert all(a > b for a, b in zip(speeds, speeds[1:], strict=False)), speeds


def test_a_probe_from_an_older_version_is_measured_again():
    path = config.cache_dir("probe") / "cpu_bandwidth.json"
    path.write_text(json.dumps({"cpu": "test cpu", "bandwidth": 1.0}))  # what the one-thread probe wrote
    measured = hardware.cpu_bandwidth("test cpu")
    assert measured != 1.0
    cached = json.loads(path.read_text())
    assert (cached["cpu"], cached["bandwidth"], cached["probe"]) == ("test cpu", measured, hardware.PROBE_VERSION)
    path.write_text(json.dumps({"cpu": "test cpu", "bandwidth": 123.0, "probe": hardware.PROBE_VERSION}))
    assert hardware.cpu_bandwidth("test cpu") == 123.0
    assert hardware.cpu_bandwidth("another cpu") != 123.0  # another CPU model is measured for itself
