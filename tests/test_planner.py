"""The planner on hardware we do not have: real-sized model summaries, described machines."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from synthetic import qwen3moe_summary

from moelocal import hardware, layout, planner
from moelocal.errors import DoesNotFitError, HardwareSpecError
from moelocal.hardware import GPU, GiB, Hardware
from moelocal.plan import CPU, Placement, RunOptions

OPTS = RunOptions(n_ctx=8192)


@pytest.fixture(scope="module")
def q30b():
    return qwen3moe_summary()


def machine(vram: list[int] | None = None, ram: int = 64 * GiB, gpu_bw: float = 1000e9) -> Hardware:
    gpus = tuple(GPU(name=f"test{i}", total=v, free=v, bandwidth=gpu_bw, tflops=100e12)
                 for i, v in enumerate(vram or []))
    return Hardware(cpu_name="test cpu", cpu_cores=8, ram_total=ram, ram_available=ram, cpu_bandwidth=60e9,
                    gpus=gpus, cpu_flops=8 * 40e9)


def all_gpu_need(summary, options=OPTS) -> int:
    """VRAM the all-on-GPU placement needs, as the planner prices it."""
    hw = machine([1000 * GiB])
    plan = planner.make_plan(summary, Placement(n_gpu_layers=summary.n_layer + 1, devices=("gpu0",)), options, hw)
    return plan.memory["gpu0"].total


def vram_for_budget(need: int) -> int:
    """The card size whose budget (after the margin) is exactly `need` bytes."""
    return int(need / (1 - planner.GPU_MARGIN)) + 1


def test_all_on_gpu_when_vram_suffices_and_experts_move_when_one_byte_short(q30b):
    need = all_gpu_need(q30b)
    roomy = planner.fit(q30b, machine([vram_for_budget(need)]), OPTS)
    assert roomy.best.placement.n_cpu_moe == 0
    assert roomy.best.placement.n_gpu_layers == q30b.n_layer + 1
    assert roomy.verdict() == "fits on the GPU"

    short = planner.fit(q30b, machine([vram_for_budget(need) - 64 * 1024]), OPTS)
    assert short.best.placement.n_cpu_moe == 1  # exactly one layer's experts go to RAM
    assert short.best.placement.tensor_overrides == layout.n_cpu_moe_overrides(1)
    assert short.verdict() == "fits with the experts of 1 of 48 layers on the CPU"
    moved = q30b.layer_bytes(0, "routed_experts")
    assert short.best.memory[CPU].weights - roomy.best.memory[CPU].weights == moved


@pytest.mark.parametrize("vram_gib", [4, 8, 12, 16, 24, 48])
def test_recommended_plan_never_exceeds_any_budget(q30b, vram_gib):
    hw = machine([vram_gib * GiB], ram=48 * GiB)
    result = planner.fit(q30b, hw, OPTS)
    best = result.best
    assert best is not None
    budget = planner.budgets(hw)
    for dev, mem in best.memory.items():
        assert mem.total <= budget[dev], (dev, mem.total, budget[dev])
    # and it is the fastest of all fitting placements, every one of them priced
    fitting = [p for p in planner.candidates(q30b, hw, OPTS, exhaustive=True) if p.fits]
    assert best.predicted.decode_tps == max(p.predicted.decode_tps for p in fitting)


@pytest.mark.parametrize("vram", [[3], [6], [10], [14], [20], [40], [12, 4], [8, 8, 8], []])
def test_bisection_picks_what_pricing_everything_picks(q30b, vram):
    """fit prices a few placements per family (bisection); pricing all ~97 chooses the same plan."""
    hw = machine([v * GiB for v in vram], ram=40 * GiB)
    some = planner.candidates(q30b, hw, OPTS)
    every = planner.candidates(q30b, hw, OPTS, exhaustive=True)
    assert len(every) == 1 or len(some) <= 20 < len(every)
    pick = planner._choose(some)
    best = planner._choose(every)
    assert (pick is None) == (best is None)
    if best is not None:
        assert some[pick].placement == every[best].placement


def test_less_vram_never_plans_more_experts_on_gpu(q30b):
    moved = []
    for gib in (24, 16, 12, 8, 6):
        best = planner.fit(q30b, machine([gib * GiB]), OPTS).best
        moved.append(best.memory[CPU].weights)
    assert moved == sorted(moved)
    assert moved[0] < moved[-1]


def test_ram_shortfall_is_reported_with_its_size(q30b):
    hw = machine(ram=8 * GiB)  # no GPU, 16 GiB of weights
    result = planner.fit(q30b, hw, OPTS)
    assert result.best is None
    cpu_only = next(p for p in result.plans if not p.placement.devices and not p.placement.from_disk)
    missing = cpu_only.memory[CPU].total - planner.budgets(hw)[CPU]
    assert cpu_only.shortfall() == {CPU: missing}
    assert result.verdict().startswith(f"does not fit: needs {missing / GiB:.1f} GiB more RAM")
    disk = [p for p in result.plans if p.placement.from_disk]
    assert len(disk) == 1 and not disk[0].fits
    assert disk[0].predicted.decode_tps < cpu_only.predicted.decode_tps
    with pytest.raises(DoesNotFitError, match="more RAM"):
        planner.plan_model(q30b, hw, OPTS)


def test_ram_is_checked_as_strictly_as_vram(q30b):
    # plenty of VRAM for the dense part, too little RAM for the experts that must go there
    hw = machine([6 * GiB], ram=4 * GiB)
    result = planner.fit(q30b, hw, OPTS)
    assert result.best is None
    for p in result.plans:
        assert not p.fits


def test_chooses_the_faster_of_two_plans_that_fit(q30b):
    fast_gpu = planner.fit(q30b, machine([64 * GiB], gpu_bw=1000e9), OPTS)
    assert fast_gpu.best.placement.devices == ("gpu0",)
    # a GPU slower than system RAM: both fit, the CPU plan is faster and wins
    slow_gpu = planner.fit(q30b, machine([64 * GiB], gpu_bw=5e9), OPTS)
    assert slow_gpu.best.placement.devices == ()
    cpu = next(p for p in slow_gpu.plans if not p.placement.devices)
    gpu_all = next(p for p in slow_gpu.plans if p.placement.devices and p.fits)
    assert cpu.predicted.decode_tps > gpu_all.predicted.decode_tps


def test_context_is_reduced_only_when_not_requested(q30b):
    big = RunOptions(n_ctx=32768)
    need_small = all_gpu_need(q30b, RunOptions(n_ctx=4096))
    hw = replace(machine([vram_for_budget(need_small)]), ram_available=2 * GiB, ram_total=2 * GiB)
    requested = planner.fit(q30b, hw, big, ctx_requested=True)
    assert requested.best is None and requested.notes == ()
    auto = planner.fit(q30b, hw, big, ctx_requested=False)
    assert auto.best is not None
    ctx = auto.best.options.n_ctx
    assert ctx in (16384, 8192, 4096)
    assert auto.notes == (f"context reduced from 32768 to {ctx} tokens so that the model fits",)
    assert planner.fit(q30b, hw, RunOptions(n_ctx=ctx * 2), ctx_requested=True).best is None


def test_kv_cache_scales_with_context_and_type(q30b):
    hw = machine(ram=256 * GiB)
    p8 = planner.make_plan(q30b, Placement(), RunOptions(n_ctx=8192), hw)
    p16 = planner.make_plan(q30b, Placement(), RunOptions(n_ctx=16384), hw)
    q8 = planner.make_plan(q30b, Placement(), RunOptions(n_ctx=16384, kv_type="q8_0"), hw)
    # 48 layers x 4 KV heads x 128 x (K + V) x 2 bytes per token
    per_token = 48 * 4 * 128 * 2 * 2
    assert p8.memory[CPU].kv == 8192 * per_token
    assert p16.memory[CPU].kv == 2 * p8.memory[CPU].kv
    assert q8.memory[CPU].kv == 16384 * 48 * 4 * 128 * 2 * 34 // 32


def test_two_gpus_split_layers_by_free_memory(q30b):
    hw = machine([16 * GiB, 16 * GiB])
    best = planner.fit(q30b, hw, OPTS).best
    assert best.placement.devices == ("gpu0", "gpu1")
    assert best.placement.n_cpu_moe == 0
    w0, w1 = best.memory["gpu0"].weights, best.memory["gpu1"].weights
    assert abs(w0 - w1) / (w0 + w1) < 0.1
    assert "-ts" in planner.llama_cpp_flags(best, hw)


def test_unequal_gpus_are_filled_by_what_each_layer_weighs(q30b):
    """12 + 4 GiB with experts in RAM: the first layers are light (their experts stay in RAM), so a
    split by free memory alone (3:1) would leave the big card half empty and overflow the small one;
    the split by bytes fills both and keeps more experts on the GPUs."""
    hw = machine([12 * GiB, 4 * GiB], ram=64 * GiB)
    best = planner.fit(q30b, hw, OPTS).best
    p = best.placement
    assert p.devices == ("gpu0", "gpu1") and 0 < p.n_cpu_moe < q30b.n_layer
    counts = [int(c) for c in p.tensor_split]
    assert list(p.tensor_split) == counts and sum(counts) == p.n_gpu_layers  # layers per device
    assert layout.layer_devices(q30b.n_layer, p).count("gpu0") == counts[0]
    for dev in ("gpu0", "gpu1"):  # both cards well used, neither over
        assert 0.8 * best.budget[dev] < best.memory[dev].total <= best.budget[dev]
    assert planner.llama_cpp_flags(best, hw)[planner.llama_cpp_flags(best, hw).index("-ts") + 1] == \
        f"{counts[0]},{counts[1]}"

    by_free = replace(p, tensor_split=(12.0, 4.0))  # llama.cpp's default: proportional to free memory
    priced = planner.make_plan(q30b, by_free, OPTS, hw)
    assert not priced.fits  # the same experts on the GPUs do not fit split 3:1

    def fits_by_free(k: int) -> bool:
        moved = replace(by_free, n_cpu_moe=k, tensor_overrides=layout.n_cpu_moe_overrides(k))
        return planner.make_plan(q30b, moved, OPTS, hw).fits

    fewer = min(k for k in range(p.n_cpu_moe, q30b.n_layer + 1) if fits_by_free(k))
    assert fewer > p.n_cpu_moe + 5  # split 3:1, many more layers' experts must go to RAM


def test_a_gpu_that_cannot_hold_anything_is_left_out(q30b):
    """A card another program fills (256 MiB free, less than CUDA takes for itself) would make every
    plan that names it fail; the plan uses the other card alone and says so."""
    MiB = 1 << 20
    hw = machine([256 * MiB, 24 * GiB])
    assert planner.unusable_gpus(hw) == ("gpu0",)
    result = planner.fit(q30b, hw, OPTS)
    best = result.best
    assert best.placement.devices == ("gpu1",) and "gpu0" not in best.memory
    assert result.verdict() == "fits on the GPU"
    assert result.notes == ("GPU0 has 256.0 MiB free, less than its backend needs for itself: left out of the plan",)
    flags = planner.llama_cpp_flags(best, hw)
    assert flags[:2] == ["-dev", "CUDA1"] and "-ts" not in flags
    forced = planner.plan_model(q30b, hw, OPTS, n_gpu_layers=10)
    assert forced.placement.devices == ("gpu1",)
    assert planner.unusable_gpus(machine([256 * MiB])) == ()  # the only card: plans name it and do not fit


def test_equal_gpus_without_expert_offload_get_equal_layers(q30b):
    hw = machine([200 * GiB, 200 * GiB])
    p = planner.balance(q30b, Placement(n_gpu_layers=q30b.n_layer + 1, devices=("gpu0", "gpu1")), hw, OPTS)
    a, b = p.tensor_split
    assert abs(a - b) <= 2 and a + b == q30b.n_layer + 1  # the output head weighs a little on gpu1


def test_unified_memory_counts_gpu_and_cpu_against_the_same_ram(q30b):
    ram = 24 * GiB
    mac = Hardware(cpu_name="Apple M4 Pro", cpu_cores=12, ram_total=ram, ram_available=ram, cpu_bandwidth=200e9,
                   gpus=(GPU("Apple M4 Pro GPU", ram * 3 // 4, ram * 3 // 4, 273e9, 9e12, "metal", True),),
                   cpu_flops=12 * 40e9)
    result = planner.fit(q30b, mac, OPTS)
    best = result.best
    assert best is not None
    assert sum(m.total for m in best.memory.values()) <= planner.budgets(mac)[CPU]


def test_forced_placement_is_priced_not_replaced(q30b):
    hw = machine([24 * GiB])
    forced = planner.plan_model(q30b, hw, OPTS, n_cpu_moe=10)
    assert forced.placement.n_cpu_moe == 10
    assert forced.placement.tensor_overrides == layout.n_cpu_moe_overrides(10)
    assert forced.fits
    assert planner.llama_cpp_flags(forced, hw)[:4] == ["-ngl", "49", "--n-cpu-moe", "10"]
    too_much = planner.plan_model(q30b, machine([4 * GiB]), OPTS, n_gpu_layers=49)
    assert not too_much.fits
    assert too_much.shortfall()["gpu0"] > 0
    cpu = planner.plan_model(q30b, hw, OPTS, cpu_moe=True)
    assert "--cpu-moe" in planner.llama_cpp_flags(cpu, hw)


def test_llama_cpp_flags_spell_out_the_plan(q30b):
    need = all_gpu_need(q30b)
    hw = machine([vram_for_budget(need) - 64 * 1024])
    best = planner.fit(q30b, hw, OPTS).best
    assert planner.llama_cpp_flags(best, hw) == ["-ngl", "49", "--n-cpu-moe", "1", "-c", "8192", "-fa", "on"]


def test_quantization_rule_prefers_quality_that_is_fast_enough():
    from gguf.constants import GGMLQuantizationType as T

    q4 = qwen3moe_summary(expert_type=T.Q4_K, name="q4")
    q8 = qwen3moe_summary(expert_type=T.Q8_0, name="q8")
    roomy = machine([80 * GiB])
    assert planner.recommend_quant([q4, q8], roomy, OPTS) == 1  # both fit and are fast: more bits win
    small = machine([8 * GiB], ram=16 * GiB)
    assert planner.recommend_quant([q4, q8], small, OPTS) == 0  # only Q4 fits
    tiny = machine(ram=4 * GiB)
    assert planner.recommend_quant([q4, q8], tiny, OPTS) is None


def test_hardware_overrides_parse_sizes_and_reject_nonsense():
    base = machine([8 * GiB])
    hw = hardware.with_overrides(base, vram=["24GiB,12GiB"], ram="64GB", gpu_bw="936GB/s", cpu_bw="80")
    assert [g.total for g in hw.gpus] == [24 * GiB, 12 * GiB]
    assert hw.ram_available == 64 * 10**9
    assert hw.gpus[1].bandwidth == 936e9 and hw.cpu_bandwidth == 80e9
    assert hardware.parse_size("512MiB") == 512 << 20
    assert hardware.parse_size("24") == 24 * GiB
    assert hardware.with_overrides(base, no_gpu=True).gpus == ()
    for bad in ("12XB", "lots", "-3GiB"):
        with pytest.raises(HardwareSpecError):
            hardware.with_overrides(base, vram=[bad])


def test_fit_json_has_the_documented_shape(q30b):
    result = planner.fit(q30b, machine([12 * GiB]), OPTS)
    data = json.loads(json.dumps(result.to_dict()))
    assert set(data) >= {"model", "hardware", "plans", "recommended"}
    plan = data["plans"][data["recommended"]]
    assert set(plan["placement"]) >= {"n_gpu_layers", "n_cpu_moe", "tensor_overrides"}
    assert set(plan["memory"]["gpu0"]) == {"weights", "kv", "compute", "output", "overhead", "total"}
    assert set(plan["predicted"]) == {"decode_tps", "prefill_tps", "decode_low", "decode_high", "basis"}
    assert plan["predicted"]["decode_low"] < plan["predicted"]["decode_tps"] < plan["predicted"]["decode_high"]
    assert plan["fits"] is True
    assert plan["placement"]["tensor_overrides"][0] == [r"blk\.0\.ffn_(up|down|gate|gate_up)_(ch|)exps", "cpu"]
