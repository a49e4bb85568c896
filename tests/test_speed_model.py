"""The speed model's behaviour: which way a prediction moves, and by how much, when one input changes.

Nothing here times this machine; scripts/bench_speed_model.py compares predictions with measurements.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import replace

import published
import pytest
from synthetic import qwen3moe_summary

from moelocal import config, hardware, layout, memory, speed
from moelocal.errors import HardwareSpecError
from moelocal.hardware import GPU, GiB, Hardware
from moelocal.plan import CPU, Placement, RunOptions

OPTS = RunOptions(n_ctx=8192)
CPU_ONLY = Placement()


@pytest.fixture(scope="module")
def q30b():
    return qwen3moe_summary()


def cpu_machine(bw: float = 60e9, flops: float = 8 * 55e9, cores: int = 8) -> Hardware:
    """A machine whose RAM bandwidth the probe measured (as hardware.detect() finds this one)."""
    return Hardware(cpu_name="test cpu", cpu_cores=cores, ram_total=256 * GiB, ram_available=256 * GiB,
                    cpu_bandwidth=bw, cpu_flops=flops, cpu_bw_rated=False)


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


# ---- against published llama.cpp runs ----------------------------------------------------------


def test_predictions_match_the_published_runs():
    """Every row of tests/data/published_speeds.json (the seven seed rows and the ones found since), priced
    as `fit --vram V --gpu-bw G --cpu-bw R --n-cpu-moe N` would: the median error at most 15%, three in
    four within 25%, and every measurement inside the predicted range."""
    rows = published.rows()
    assert len(rows) >= 24 and sum(r["set"] == "seed" for r in rows) == 7
    errors, outside = [], []
    for row in rows:
        p = published.plan(row).predicted
        errors.append(abs(p.decode_tps / row["decode_tps"] - 1))
        if not p.decode_low <= row["decode_tps"] <= p.decode_high:
            outside.append((row["model"], row.get("n_cpu_moe"), p.decode_low, row["decode_tps"], p.decode_high))
    errors.sort()
    assert statistics.median(errors) <= 0.15, errors
    assert sum(e <= 0.25 for e in errors) >= 0.75 * len(errors), errors
    assert not outside
    seed = [abs(published.plan(r).predicted.decode_tps / r["decode_tps"] - 1) for r in rows if r["set"] == "seed"]
    assert statistics.median(seed) <= 0.15 and sum(e <= 0.25 for e in seed) >= 0.75 * len(seed), seed


def test_published_shapes_weigh_what_the_real_files_do():
    # file sizes of the real GGUFs: 18,556,685,824 B (Qwen's Q4_K_M), 12.1 GB and 63.4 GB (ggml-org's MXFP4)
    assert published.model("Qwen3-30B-A3B", "Q4_K_M").tensor_bytes == pytest.approx(18.557e9, rel=0.005)
    assert published.model("gpt-oss-20b", "MXFP4").tensor_bytes == pytest.approx(12.1e9, rel=0.01)
    assert published.model("gpt-oss-120b", "MXFP4").tensor_bytes == pytest.approx(63.4e9, rel=0.01)
    # llama.cpp's load log of Unsloth's Qwen3-235B-A22B Q4_K_M: "model size = 132.386 GiB (4.837 BPW)"
    assert published.model("Qwen3-235B-A22B", "Q4_K_M").tensor_bytes / GiB == pytest.approx(132.386, abs=0.01)


def test_a_many_channel_box_pays_more_for_each_layer_its_cpu_runs_for_a_gpu():
    """Each layer whose experts a many-channel machine's CPU runs for the GPU costs it more (more cores to start
    and join over more dies), so there keeping attention on the GPU can be slower than the CPU alone; a desktop
    and this machine's probe path keep CPU_MOE_LAYER_OVERHEAD_S."""
    def row(ram: str, vram: str | None = "24GiB") -> dict:
        return {"model": "Qwen3-30B-A3B", "quant": "Q4_K_M", "vram": vram, "gpu_bw_rated": "936GB/s",
                "ram_bw_rated": ram, "ngl": 99, "n_cpu_moe": 48}

    def split_cost(ram: str) -> float:
        return speed.cpu_split_overhead(published.machine(row(ram)))

    assert split_cost("64GB/s") == split_cost("96GB/s") == speed.CPU_MOE_LAYER_OVERHEAD_S
    assert split_cost("204.8GB/s") == pytest.approx(2.048 * speed.CPU_MOE_LAYER_OVERHEAD_S)
    assert split_cost("460.8GB/s") == pytest.approx(4.608 * speed.CPU_MOE_LAYER_OVERHEAD_S)
    assert speed.cpu_split_overhead(cpu_machine(bw=460.8e9)) == speed.CPU_MOE_LAYER_OVERHEAD_S  # the probe's figure
    # every one of the 48 layers is split: the CPU's fixed work is 48 of them
    server = row("460.8GB/s")
    parts = speed.decode_parts(published.model("Qwen3-30B-A3B", "Q4_K_M"), published.plan(server).placement,
                               RunOptions(n_ctx=4096), published.machine(server))
    assert parts[(CPU, speed.LAYERS)] == pytest.approx(48 * 4.608 * speed.CPU_MOE_LAYER_OVERHEAD_S)
    # a 12-channel DDR5-4800 server: experts on the CPU behind a 24 GB GPU decode slower than the CPU alone ...
    tps = {(ram, vram): published.plan(row(ram, vram)).predicted.decode_tps
           for ram in ("460.8GB/s", "96GB/s") for vram in ("24GiB", None)}
    assert tps[("460.8GB/s", "24GiB")] < tps[("460.8GB/s", None)]
    # ... while on a dual-channel desktop the GPU helps
    assert tps[("96GB/s", "24GiB")] > 1.3 * tps[("96GB/s", None)]


def test_a_rated_figure_is_turned_into_achieved_bandwidth(q30b):
    probe = cpu_machine(bw=64e9)
    rated = replace(probe, cpu_bw_rated=True)
    assert speed.cpu_decode_bandwidth(probe) == 64e9 * speed.CPU_BW_EFFICIENCY
    achieved = 64e9 * speed.CPU_RATED_EFFICIENCY
    assert speed.cpu_decode_bandwidth(rated) == pytest.approx(achieved / (1 + achieved / speed.CPU_SATURATION_BW))
    assert decode(q30b, rated) < decode(q30b, probe)  # a spec sheet promises more than llama.cpp reads
    # many channels: 12 x DDR5-4800 is 7.2x a dual-channel DDR5-4000 box, but decodes only 3.4x as fast
    server = replace(rated, cpu_bandwidth=460.8e9)
    assert speed.cpu_decode_bandwidth(server) / speed.cpu_decode_bandwidth(rated) == pytest.approx(3.37, abs=0.01)
    # and a rated figure is less sure than a measured one
    p_rated, p_probe = speed.predict(q30b, CPU_ONLY, OPTS, rated), speed.predict(q30b, CPU_ONLY, OPTS, probe)
    assert p_rated.decode_high / p_rated.decode_low > p_probe.decode_high / p_probe.decode_low > 1.2
    assert p_rated.basis == "from rated bandwidths"
    assert p_probe.basis == "from the RAM bandwidth measured here"


def test_a_calibration_replaces_the_default_factors_and_narrows_the_range(q30b):
    hw = cpu_machine()
    cal = replace(hw, calibration=speed.Calibration(cpu_decode_eff=0.5, cpu_prefill_eff=2.0, runs=3, source="test"))
    base, calibrated = speed.predict(q30b, CPU_ONLY, OPTS, hw), speed.predict(q30b, CPU_ONLY, OPTS, cal)
    expected = read_per_token(q30b, OPTS) / (hw.cpu_bandwidth * 0.5) + q30b.n_layer * speed.CPU_LAYER_OVERHEAD_S
    assert abs(1 / calibrated.decode_tps - expected) <= rounding(calibrated.decode_tps)
    assert calibrated.prefill_tps == pytest.approx(2 * base.prefill_tps, rel=1e-3)
    assert calibrated.basis == "calibrated on this machine, 3 runs"
    assert (calibrated.decode_high / calibrated.decode_low) < (base.decode_high / base.decode_low)
    assert calibrated.decode_low < calibrated.decode_tps < calibrated.decode_high


def test_the_range_holds_the_prediction_and_widens_with_spec_sheets(q30b):
    gpu = GPU(name="test gpu", total=80 * GiB, free=80 * GiB, bandwidth=1000e9, tflops=100e12)
    hw = replace(cpu_machine(), gpus=(gpu,), cpu_bw_rated=True)
    placement = Placement(n_gpu_layers=q30b.n_layer + 1, n_cpu_moe=20, tensor_overrides=layout.n_cpu_moe_overrides(20),
                          devices=("gpu0",))
    p = speed.predict(q30b, placement, OPTS, hw)
    assert p.decode_low < p.decode_tps < p.decode_high
    # a token's time: the slowest case takes every part at its slowest factor
    parts = speed.decode_parts(q30b, placement, OPTS, hw)
    assert {what for _, what in parts} == {speed.EXPERTS, speed.WEIGHTS, speed.KV, speed.LAYERS, speed.HANDOFFS}
    assert 1 / sum(parts.values()) == pytest.approx(p.decode_tps, abs=0.006)


# ---- many sequences at once --------------------------------------------------------------------


def test_n_sequences_read_the_dense_weights_once_and_the_union_of_their_experts(q30b):
    hw = cpu_machine(bw=60e9, flops=1e15)  # compute never binds here
    one = speed.decode_parts(q30b, CPU_ONLY, OPTS, hw)
    four = speed.decode_parts(q30b, CPU_ONLY, OPTS, hw, n_seq=4)
    e, k = q30b.n_expert, q30b.n_expert_used
    union = e * (1 - (1 - k / e) ** 4)  # 29.2 of 128 experts a layer, not 4 x 8 = 32
    assert four[(CPU, speed.EXPERTS)] == pytest.approx(one[(CPU, speed.EXPERTS)] * union / k)
    assert four[(CPU, speed.WEIGHTS)] == pytest.approx(one[(CPU, speed.WEIGHTS)])
    assert four[(CPU, speed.KV)] == pytest.approx(4 * one[(CPU, speed.KV)])
    assert four[(CPU, speed.LAYERS)] == one[(CPU, speed.LAYERS)]
    tps = [speed.throughput(q30b, CPU_ONLY, OPTS, hw, n) for n in (1, 2, 4, 8)]
    assert tps[0] == pytest.approx(decode(q30b, hw), abs=0.01)
    assert all(a < b for a, b in zip(tps, tps[1:], strict=False)), tps  # more sequences, more tokens a second ...
    assert tps[3] < 8 * tps[0]  # ... but not 8 times as many: their experts differ


def test_throughput_is_bound_by_compute_once_the_reads_are_shared(q30b):
    slow_cpu = cpu_machine(bw=60e9, flops=50e9)
    # 64 tokens' FLOPs (2 x 3.3B active parameters each) take 8.4 s at 50 GFLOP/s, far more than reading
    tps = speed.throughput(q30b, CPU_ONLY, OPTS, slow_cpu, 64)
    flops_per_token = 2 * sum(t.n_params * (q30b.n_expert_used / q30b.n_expert if t.role == "routed_experts" else 1)
                              for t in q30b.tensors if t.role != "embeddings")
    assert tps == pytest.approx(50e9 / flops_per_token, rel=0.05)


def test_calibrating_on_one_model_predicts_another(q30b):
    """What `moelocal bench` does: measure one model, then predict a different one on the same machine."""
    truth = replace(cpu_machine(), calibration=speed.Calibration(cpu_decode_eff=0.55, cpu_prefill_eff=0.7, runs=1))
    small = qwen3moe_summary(n_layer=24, n_expert=64)
    measured = speed.predict(small, CPU_ONLY, OPTS, truth)  # stands in for what llama.cpp would reach
    cal = speed.calibrate([speed.Measured(small, CPU_ONLY, OPTS, measured.decode_tps, measured.prefill_tps)],
                          cpu_machine(), source="test")
    assert cal.cpu_decode_eff == pytest.approx(0.55, rel=0.01) and cal.cpu_prefill_eff == pytest.approx(0.7, rel=0.01)
    assert (cal.gpu_decode_eff, cal.gpu_prefill_eff, cal.runs, cal.source) == (None, None, 1, "test")
    other = speed.predict(q30b, CPU_ONLY, OPTS, replace(cpu_machine(), calibration=cal))
    assert other.decode_tps == pytest.approx(speed.predict(q30b, CPU_ONLY, OPTS, truth).decode_tps, rel=0.01)


# ---- describing another machine the way people know it ------------------------------------------


def test_gpus_are_found_by_the_names_people_use():
    assert hardware.lookup_gpu("RTX 3090") == ("RTX 3090", 936e9, 142e12, 24 * GiB)
    for spelling in ("rtx3090", "NVIDIA GeForce RTX 3090", "3090", "  rtx  3090 "):
        assert hardware.lookup_gpu(spelling)[0] == "RTX 3090"
    assert hardware.lookup_gpu("rtx 3070ti")[:2] == ("RTX 3070 Ti", 608e9)
    assert hardware.lookup_gpu("Quadro RTX 5000")[1:] == (448e9, 89e12, 16 * GiB)
    with pytest.raises(HardwareSpecError) as err:
        hardware.lookup_gpu("RTX 3095")
    assert "unknown GPU 'RTX 3095'" in str(err.value) and "RTX 3090" in err.value.hint
    assert hardware.lookup_gpu("apple m2 max")[3] is None  # shares RAM: no size of its own


def test_gpu_names_describe_the_cards_and_vram_still_sets_their_memory():
    base = cpu_machine()
    hw = hardware.with_overrides(base, gpu=["RTX 4090,RTX 3090", "RTX 3060"])
    assert [(g.name, g.total, g.bandwidth) for g in hw.gpus] == [
        ("RTX 4090", 24 * GiB, 1008e9), ("RTX 3090", 24 * GiB, 936e9), ("RTX 3060", 12 * GiB, 360e9)]
    assert "gpu" in hw.overridden
    hw = hardware.with_overrides(base, gpu=["RTX 3090"], vram=["20GiB"], gpu_bw="1000GB/s")
    assert [(g.total, g.free, g.bandwidth) for g in hw.gpus] == [(20 * GiB, 20 * GiB, 1000e9)]
    with pytest.raises(HardwareSpecError):
        hardware.with_overrides(base, gpu=["RTX 3090"], vram=["20GiB", "12GiB"])
    with pytest.raises(HardwareSpecError):
        hardware.with_overrides(base, gpu=["Apple M2 Max"])  # needs --vram
    assert hardware.with_overrides(base, gpu=["RTX 3090"], no_gpu=True).gpus == ()


def test_ram_bandwidth_as_a_spec_or_a_rated_figure():
    assert hardware.parse_ram_bandwidth("DDR5-6000x2") == 96e9  # 6000 MT/s x 8 bytes x 2 channels
    assert hardware.parse_ram_bandwidth("ddr4-3200x4") == 102.4e9
    assert hardware.parse_ram_bandwidth("DDR5-5600") == 89.6e9  # a desktop's two channels unless said
    assert hardware.parse_ram_bandwidth("DDR5-4800 x 12") == 460.8e9
    assert hardware.parse_ram_bandwidth("96GB/s") == hardware.parse_ram_bandwidth("96") == 96e9
    for bad in ("fast", "DDR5-6000x99", "DDR9-6000x2"):
        with pytest.raises(HardwareSpecError):
            hardware.parse_ram_bandwidth(bad)
    hw = hardware.with_overrides(cpu_machine(), cpu_bw="DDR5-6000x2")
    assert (hw.cpu_bandwidth, hw.cpu_bw_rated) == (96e9, True)
    assert not cpu_machine().cpu_bw_rated  # what the probe measured here is not a rating
    assert not hardware.detect().cpu_bw_rated and hardware.detect(probe=False).cpu_bw_rated  # a guess is no better


def test_fit_takes_gpu_names_and_ram_specs(capsys):
    from moelocal import cli

    try:
        cli.main(["fit", "--gpu", "RTX 3090", "--cpu-bw", "DDR5-6000x2", "--ram", "64GiB", "--json"])
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    out, _ = capsys.readouterr()
    data = json.loads(out[out.index("{"):])
    assert code == 0
    gpus = [(g["name"], g["total"], g["bandwidth"]) for g in data["hardware"]["gpus"]]
    assert gpus == [("RTX 3090", 24 * GiB, 936e9)]
    assert data["hardware"]["cpu"]["bandwidth"] == 96e9
    assert data["plans"][data["recommended"]]["predicted"]["basis"] == "from rated bandwidths"
    with pytest.raises(SystemExit) as exc:
        cli.main(["fit", "--gpu", "RTX 3095"])
    assert exc.value.code == 2
    assert "nearest: RTX 3090" in capsys.readouterr().err


def test_the_machine_says_what_its_figures_rest_on():
    cal = speed.Calibration(cpu_decode_eff=0.6, runs=2, source="t")
    hw = replace(cpu_machine(), cpu_bw_rated=True, calibration=cal)
    d = hw.to_dict()
    assert d["cpu"]["bandwidth_rated"] is True
    assert d["calibration"] == {"cpu_decode_eff": 0.6, "cpu_prefill_eff": None, "gpu_decode_eff": None,
                                "gpu_prefill_eff": None, "runs": 2, "source": "t"}
    assert "calibration" not in cpu_machine().to_dict()
