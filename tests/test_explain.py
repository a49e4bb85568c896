"""`fit` explains itself (moelocal/explain.py): what bounds the speed, what would make it faster, how much
context fits, which KV-cache types fit more; and how many requests `batch` runs at once."""

from __future__ import annotations

import json
from dataclasses import replace

import published
import pytest
from synthetic import qwen3moe_summary

from moelocal import cli, explain, memory, planner, speed
from moelocal.errors import DoesNotFitError
from moelocal.hardware import GPU, GiB, Hardware
from moelocal.plan import CPU, RunOptions

OPTS = RunOptions(n_ctx=8192)


@pytest.fixture(scope="module")
def q30b():
    return qwen3moe_summary()


def machine(vram: int = 0, ram: int = 64 * GiB) -> Hardware:
    gpus = (GPU(name="test gpu", total=vram, free=vram, bandwidth=936e9, tflops=142e12),) if vram else ()
    return Hardware(cpu_name="test cpu", cpu_cores=8, ram_total=ram, ram_available=ram, cpu_bandwidth=96e9,
                    cpu_flops=8 * 60e9, gpus=gpus, cpu_bw_rated=True)


def test_the_bounds_are_the_largest_shares_of_a_tokens_time():
    q30b = published.model("Qwen3-30B-A3B", "Q4_K_M")  # the real file's types: Q4_K, Q6_K here and there
    result = planner.fit(q30b, machine(), OPTS)
    best = result.best
    parts = speed.decode_parts(q30b, best.placement, best.options, result.hardware)
    total = sum(parts.values())
    bounds = explain.bounds(q30b, best, result.hardware)
    assert (bounds[0].device, bounds[0].part) == (CPU, speed.EXPERTS)  # a CPU-only MoE reads experts, mostly
    assert bounds[0].share == pytest.approx(parts[(CPU, speed.EXPERTS)] / total)
    assert list(b.share for b in bounds) == sorted((b.share for b in bounds), reverse=True)
    assert bounds[0].text() == f"{bounds[0].share:.0%} of each token's time is reading routed experts from RAM"


def test_faster_names_the_vram_the_all_gpu_plan_lacks(q30b):
    result = planner.fit(q30b, machine(vram=16 * GiB), OPTS)
    all_gpu = result.plans[0]
    assert not all_gpu.fits and result.best is not all_gpu
    ways = explain.faster(result)
    top = next(f for f in ways if f.label == all_gpu.placement.describe(q30b.n_layer))
    assert top.needs == f"+{memory_text(all_gpu.shortfall()['gpu0'])} of VRAM"
    assert top.decode_tps == all_gpu.predicted.decode_tps > result.best.predicted.decode_tps
    assert top.text().startswith(top.needs + ": ~")


def memory_text(n: int) -> str:
    from moelocal.units import human_bytes

    return human_bytes(n)


def test_the_context_ladder_ends_at_the_largest_context_that_fits(q30b):
    hw = machine(vram=16 * GiB, ram=24 * GiB)
    result = planner.fit(q30b, hw, OPTS)
    why = explain.explain(result)
    best = result.best
    largest = why.max_ctx
    assert planner.make_plan(q30b, best.placement, replace(best.options, n_ctx=largest), hw).fits
    assert largest == q30b.context_length or \
        not planner.make_plan(q30b, best.placement, replace(best.options, n_ctx=largest + 1024), hw).fits
    assert [c for c, _ in why.context_fits] == [8192, 16384, 32768, 40960]  # up to the model's own
    assert all(ok == (c <= largest) for c, ok in why.context_fits)
    # smaller KV-cache types: the bytes they save at this context, and a larger context that fits
    f16 = sum(memory.kv_bytes_by_layer(q30b, best.options))
    by_type = {kv.kv_type: kv for kv in why.kv_options}
    assert set(by_type) == {"q8_0", "q4_0"}
    q8 = sum(memory.kv_bytes_by_layer(q30b, replace(best.options, kv_type="q8_0")))
    assert by_type["q8_0"].saves == f16 - q8
    assert by_type["q4_0"].saves > by_type["q8_0"].saves
    assert by_type["q4_0"].max_ctx >= by_type["q8_0"].max_ctx >= largest
    assert by_type["q8_0"].flags == ("-ctk", "q8_0", "-ctv", "q8_0")


def test_batch_use_is_priced_for_several_sequences(q30b):
    result = planner.fit(q30b, machine(ram=256 * GiB), OPTS)
    why = explain.explain(result)
    assert [n for n, _ in why.batch_tps] == [4, 8]
    single = result.best.predicted.decode_tps
    assert single < why.batch_tps[0][1] < why.batch_tps[1][1]


def test_batch_runs_as_many_at_once_as_decode_fastest_and_fit(q30b):
    roomy = machine(ram=256 * GiB)
    per_seq = RunOptions(n_ctx=4096)
    assert explain.choose_parallel(q30b, roomy, per_seq, 1) == 1
    assert explain.choose_parallel(q30b, roomy, per_seq, 3) == 2  # never more than there are requests
    n = explain.choose_parallel(q30b, roomy, per_seq, 100)
    assert n == 16  # a bandwidth-bound MoE on the CPU: each doubling still gains more than 10%
    # in less RAM the extra sequences' KV cache (384 MiB each at 4096 tokens) is what stops it
    plan_1 = planner.plan_model(q30b, roomy, replace(per_seq, n_seq=1))
    tight = machine(ram=int((plan_1.memory[CPU].total + 4 * 400 * 2**20) / 0.95))
    chosen = explain.choose_parallel(q30b, tight, per_seq, 100)
    assert chosen == 4  # 8 sequences' 3 GiB of KV cache would not fit
    assert planner.plan_model(q30b, tight, RunOptions(n_ctx=4096 * 4, n_seq=4)).fits
    with pytest.raises(DoesNotFitError):
        planner.plan_model(q30b, tight, RunOptions(n_ctx=4096 * 8, n_seq=8))


def test_fit_prints_the_explanation_in_80_columns_and_in_json(models, capsys):
    path = str(models["qwen3moe-q8_0"])
    assert run(["fit", path, "--no-gpu", "--ram", "8GiB", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    why = data["explain"]
    assert set(why) >= {"decode_tps", "decode_low", "decode_high", "basis", "bounds", "faster", "context_fits",
                        "max_ctx", "kv_options", "batch_tps"}
    assert why["bounds"][0]["text"].endswith("from RAM") or "per-layer work" in why["bounds"][0]["text"]
    assert run(["fit", path, "--no-gpu", "--ram", "8GiB"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert any(line.startswith("speed: ") for line in lines)
    assert any(line.startswith("context: ") for line in lines)
    explained = lines[next(i for i, line in enumerate(lines) if line.startswith("speed: ")):]
    assert all(len(line) <= 80 for line in explained), [line for line in explained if len(line) > 80]


def run(args: list[str]) -> int:
    try:
        cli.main(args)
    except SystemExit as exc:
        return exc.code or 0
    return 0


def test_without_a_gpu_faster_prices_a_common_card():
    q30b = published.model("Qwen3-30B-A3B", "Q4_K_M")
    result = planner.fit(q30b, machine(), OPTS)
    ways = {f.needs: f for f in explain.faster(result)}
    card = ways["a 24 GiB GPU like the RTX 3090"]
    hw = replace(machine(), gpus=(GPU(name="RTX 3090", total=24 * GiB, free=24 * GiB, bandwidth=936e9,
                                      tflops=142e12),))
    assert card.decode_tps == planner.fit(q30b, hw, OPTS).best.predicted.decode_tps
    assert card.label == "all on GPU"  # 18.6 GB of Q4_K_M fits a 24 GiB card
    faster_ram = ways["RAM 1.5x as fast"]
    assert result.best.predicted.decode_tps < faster_ram.decode_tps < 1.5 * result.best.predicted.decode_tps
