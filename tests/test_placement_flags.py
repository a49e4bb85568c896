"""Placement flags as llama.cpp reads them: --n-cpu-moe, --cpu-moe, -ngl and -ot priced by `fit`.

`fit` turns the flags into the same Placement the run commands load, and prices it beside the
recommendation. Over a loopback RPC worker (a real offload target without a GPU) the memory it
predicts per device is what llama.cpp itself reserves for those flags; the -ot syntax (PATTERN=BUFFER,
comma-separated, first match wins, regex search) and the "last N layers" family are checked by hand.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator

import pytest
from loopback import rpc_worker
from synthetic import qwen3moe_summary
from typer.testing import CliRunner

from moelocal import hardware, layout, native, planner
from moelocal.cli import app
from moelocal.commands._run import PlacementFlags, build_plan
from moelocal.errors import UsageError
from moelocal.gguf_model import read_summary
from moelocal.hardware import GPU, GiB, Hardware
from moelocal.measure import measure
from moelocal.plan import CPU, Placement, RunOptions

EXPS = ("ffn_gate_exps", "ffn_down_exps", "ffn_up_exps")
N_CTX = 512


def gpu_machine(vram: int = 24 * GiB, n_gpus: int = 1) -> Hardware:
    gpus = tuple(GPU(f"test gpu {i}", vram, vram, 936e9, 142e12) for i in range(n_gpus))
    return Hardware(cpu_name="test cpu", cpu_cores=8, ram_total=64 * GiB, ram_available=64 * GiB,
                    cpu_bandwidth=60e9, gpus=gpus, cpu_flops=8 * 60e9)


# ---- -ot syntax ------------------------------------------------------------------------------


def test_ot_values_split_on_commas_and_name_llama_cpp_buffer_types():
    hw = hardware.with_workers(gpu_machine(n_gpus=2),
                               [hardware.WorkerInfo("10.0.0.2:50052", (hardware.WorkerDevice(8 * GiB, 8 * GiB),) * 2,
                                                    (7, 0, 0))])
    got = layout.parse_tensor_overrides([r"blk\.1\.ffn_up_exps=CPU,blk\.2\.=CUDA1", r"exps=RPC1[10.0.0.2:50052]",
                                         "attn=rpc0", "token_embd=RPC[10.0.0.2:50052]"], hw)
    assert got == ((r"blk\.1\.ffn_up_exps", CPU), (r"blk\.2\.", "gpu1"), ("exps", "rpc1"), ("attn", "rpc0"),
                   ("token_embd", "rpc0"))
    assert layout.buffer_type_names(hw) == ["CPU", "CUDA0", "CUDA1", "RPC0[10.0.0.2:50052]", "RPC1[10.0.0.2:50052]"]
    with pytest.raises(UsageError) as err:
        layout.parse_tensor_overrides(["exps=CUDA2"], hw)
    assert str(err.value) == ("-ot: unknown buffer type 'CUDA2' (buffer types here: CPU, CUDA0, CUDA1, "
                              "RPC0[10.0.0.2:50052], RPC1[10.0.0.2:50052])")
    with pytest.raises(UsageError, match=r"-ot 'exps': expected PATTERN=BUFFER_TYPE"):
        layout.parse_tensor_overrides(["exps"], hw)
    with pytest.raises(UsageError, match=r"is not a valid regular expression"):
        layout.parse_tensor_overrides(["blk\\.(1=CPU"], hw)


def test_the_first_matching_pattern_wins_and_patterns_are_searched_not_matched():
    s = qwen3moe_summary(n_layer=8)
    hw = gpu_machine(n_gpus=2)
    ot = layout.parse_tensor_overrides([r"blk\.3\.ffn_up=CUDA0,ffn_(up|down)_exps=CPU,blk\.3\.=CUDA1"], hw)
    p = planner.forced_placement(s, hw, n_gpu_layers=9, overrides=ot)
    where = {loc.tensor.name: loc.device for loc in layout.locate(s, p)}
    assert where["blk.3.ffn_up_exps.weight"] == "gpu0"  # the first pattern, though the second matches too
    assert where["blk.3.ffn_down_exps.weight"] == CPU
    assert where["blk.5.ffn_up_exps.weight"] == CPU  # "ffn_(up|down)_exps" is found inside the name
    assert where["blk.3.ffn_gate_exps.weight"] == "gpu1" and where["blk.3.attn_q.weight"] == "gpu1"
    assert where["blk.5.ffn_gate_exps.weight"] == layout.layer_devices(8, p)[5]  # no pattern: the layer's device


def test_the_last_layers_regex_is_compact_and_exact():
    assert layout.int_range_regex(40, 47) == "4[0-7]"
    assert layout.int_range_regex(36, 47) == "3[6-9]|4[0-7]"
    assert layout.int_range_regex(0, 47) == "[0-9]|[1-3][0-9]|4[0-7]"
    for lo, hi in [(0, 0), (5, 12), (9, 10), (28, 47), (90, 131), (1, 100), (0, 199)]:
        rx = re.compile(rf"blk\.({layout.int_range_regex(lo, hi)})\.")
        assert [i for i in range(300) if rx.search(f"blk.{i}.ffn_up_exps.weight")] == list(range(lo, hi + 1))
    assert layout.last_n_cpu_moe_overrides(8, 48) == ((rf"blk\.(4[0-7]){layout.EXPS_REGEX}", CPU),)


def test_the_planner_offers_the_last_layers_family_and_its_flags():
    s = qwen3moe_summary()
    hw = gpu_machine(12 * GiB)
    result = planner.fit(s, hw, RunOptions(n_ctx=8192))
    best = result.best
    assert best.placement.n_cpu_moe == 20 and not best.placement.experts_last
    twin = next(p for p in result.plans if p.placement.experts_last)
    assert twin.placement.n_cpu_moe == 20 and twin.fits
    assert twin.placement.describe(s.n_layer) == "GPU, experts of the last 20 layers in RAM"
    # the same bytes leave the GPU, from the other end
    assert {d: m.weights for d, m in twin.memory.items()} == {d: m.weights for d, m in best.memory.items()}
    moved = {loc.tensor.layer for loc in layout.locate(s, twin.placement)
             if loc.tensor.role == "routed_experts" and loc.device == CPU}
    assert moved == set(range(28, 48))
    assert planner.llama_cpp_flags(twin, hw)[:4] == [
        "-ngl", "49", "-ot", r"blk\.(2[8-9]|3[0-9]|4[0-7])\.ffn_(up|down|gate|gate_up)_(ch|)exps=CPU"]


def test_fit_prices_the_asked_placement_beside_the_recommendation(models):
    path = models["qwen3moe-q8_0"]
    runner = CliRunner()
    ot = r"blk\.[23]\.ffn_(up|down|gate)_exps=CPU"
    result = runner.invoke(app, ["fit", str(path), "--vram", "4GiB", "--ctx", str(N_CTX), "-ot", ot, "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    asked = [p for p in data["plans"] if p["asked"]]
    assert len(asked) == 1 and data["plans"].index(asked[0]) == data["asked"] != data["recommended"]
    assert asked[0]["placement"]["tensor_overrides"] == [[r"blk\.[23]\.ffn_(up|down|gate)_exps", "cpu"]]
    assert asked[0]["placement"]["n_gpu_layers"] == 5 and asked[0]["label"] == "all on GPU, 1 -ot override"
    summary = read_summary(path)
    experts = sum(t.n_bytes for t in summary.tensors if t.role == "routed_experts" and t.layer in (2, 3))
    assert asked[0]["memory"]["cpu"]["weights"] - data["plans"][0]["memory"]["cpu"]["weights"] == experts
    # the same flag for people: a row marked "asked" and a line with its flags
    text = runner.invoke(app, ["fit", str(path), "--vram", "4GiB", "--ctx", str(N_CTX), "--n-cpu-moe", "2"])
    assert text.exit_code == 0, text.output
    assert "asked" in text.stdout and "asked for: GPU, experts of 2 layers in RAM" in text.stdout
    assert "-ngl 5 --n-cpu-moe 2 -c 512" in text.stdout.split("asked for:")[1]
    # the asked placement equal to the recommendation is marked on that row
    same = json.loads(runner.invoke(app, ["fit", str(path), "--vram", "4GiB", "--ctx", str(N_CTX), "--ngl", "5",
                                          "--json"]).stdout)
    assert same["asked"] == same["recommended"]


def test_run_commands_take_ot_and_build_that_placement(models):
    summary = read_summary(models["qwen3moe-q8_0"])
    hw = gpu_machine(4 * GiB)
    plan = build_plan(summary, PlacementFlags(overrides=(r"blk\.0\.ffn_up_exps=CPU",), n_cpu_moe=1), ctx=N_CTX,
                      threads=1, hw=hw)
    assert plan.placement.tensor_overrides == ((r"blk\.0\.ffn_up_exps", CPU), *layout.n_cpu_moe_overrides(1))
    assert planner.llama_cpp_flags(plan, hw)[:6] == ["-ngl", "5", "-ot", r"blk\.0\.ffn_up_exps=CPU",
                                                     "--n-cpu-moe", "1"]
    with pytest.raises(UsageError, match="unknown buffer type 'CUDA0'"):
        build_plan(summary, PlacementFlags(overrides=("exps=CUDA0",)), ctx=N_CTX, threads=1,
                   hw=hardware.with_overrides(hw, no_gpu=True))


# ---- against llama.cpp, over a loopback worker -----------------------------------------------


@pytest.fixture(scope="module")
def worker(tmp_path_factory) -> Iterator[tuple[str, dict[str, int]]]:
    """A `moelocal worker` serving the CPU on loopback, connected in this process as rpc0."""
    def argv(port: int) -> list[str]:
        return [sys.executable, "-m", "moelocal", "worker", "--port", str(port), "--device", "CPU", "--threads", "1"]

    with rpc_worker(argv, tmp_path_factory.mktemp("worker")) as endpoint:
        yield endpoint, {"rpc0": native.rpc_add_server(endpoint)[0]}


@pytest.mark.parametrize("arch", ["qwen3moe", "deepseek2"])
def test_flags_price_exactly_what_llama_cpp_reserves_per_device(models, worker, arch):
    """Each set of flags, as `fit` reads them, against llama.cpp's own breakdown of the same load."""
    endpoint, named = worker
    path = models[f"{arch}-q8_0"]
    summary = read_summary(path)
    hw = hardware.with_workers(gpu_machine(0, 0), [hardware.WorkerInfo(endpoint, (hardware.WorkerDevice(
        8 * GiB, 8 * GiB),), (7, 0, 0))])
    buft = native.rpc_buffer_type_name(endpoint, 0)
    assert layout.buffer_type_names(hw)[1] == buft  # the name llama.cpp's -ot wants for the worker
    options = RunOptions(n_ctx=N_CTX)
    cases = [
        dict(n_cpu_moe=2),
        dict(cpu_moe=True),
        dict(n_gpu_layers=3),
        dict(n_gpu_layers=3, cpu_moe=True),
        dict(overrides=[r"blk\.(2|3)\.ffn_(up|down|gate)_exps=CPU"]),
        # the usual -ot: every expert in RAM but those of a few layers, which stay on the device
        dict(overrides=[rf"blk\.[01]\.ffn_(up|down|gate)_exps=RPC0[{endpoint}],exps=CPU"]),
        dict(overrides=[rf"blk\.3\.ffn_.*_exps=RPC[{endpoint}]"], n_cpu_moe=4),
    ]
    for case in cases:
        ot = layout.parse_tensor_overrides(case.pop("overrides", ()), hw)
        result = planner.fit(summary, hw, options, asked=planner.forced_placement(summary, hw, overrides=ot, **case))
        plan = result.plans[result.asked]
        real = measure(path, plan.placement, plan.options, named=named)
        for dev in (CPU, "rpc0"):
            est, got = plan.memory[dev], real[dev]
            assert (est.kv, est.compute) == (got.kv, got.compute), (case, dev)
            assert 0 <= got.weights - est.weights <= 32 * len(summary.tensors), (case, dev)
        moved = {loc.tensor.name for loc in layout.locate(summary, plan.placement) if loc.device == CPU}
        if case == {"n_cpu_moe": 2} and arch == "deepseek2":  # layer 0 is dense: only layer 1's experts move
            assert {n for n in moved if "_exps" in n} == {f"blk.1.{t}.weight" for t in EXPS}


def test_a_cpu_only_machine_takes_the_flags_and_runs_everything_in_ram(models):
    summary = read_summary(models["qwen3moe-q8_0"])
    hw = hardware.with_overrides(gpu_machine(), no_gpu=True)
    for flags in (dict(n_gpu_layers=5), dict(cpu_moe=True), dict(overrides=[(r"exps", CPU)])):
        p = planner.forced_placement(summary, hw, **flags)
        assert p == Placement()


# ---- a GPU build that finds no usable GPU ----------------------------------------------------


def test_gpus_llama_cpp_cannot_use_are_left_out_with_one_line():
    hw = hardware.with_workers(gpu_machine(n_gpus=2), [hardware.WorkerInfo("h:1", (hardware.WorkerDevice(GiB, GiB),),
                                                                           (7, 0, 0))])
    assert hardware.usable_by_llama(hw, 2, ("CUDA",)) == (hw, None)
    why = "CUDA driver version is insufficient for CUDA runtime version"
    out, line = hardware.usable_by_llama(hw, 0, ("CUDA",), why)
    assert [g.backend for g in out.gpus] == ["rpc"] and out.gpu_names == ("rpc0",)
    assert line == ("llama.cpp (CUDA) can use 0 of the 2 GPU(s) here (CUDA driver version is insufficient for CUDA "
                    "runtime version): planning and running on the CPU")
    one, line = hardware.usable_by_llama(hw, 1, ("CUDA",))
    assert one.gpu_names == ("gpu0", "rpc0") and line.endswith("can use 1 of the 2 GPU(s) here: using the first 1")
    cpu_build, line = hardware.usable_by_llama(hw, 0, ())
    assert line.startswith("this llama-cpp-python is a CPU-only build: the 2 GPU(s) here go unused")
    none = replace_gpus(hw, ())
    assert hardware.usable_by_llama(none, 0, ()) == (none, None)
    assert hardware.usable_by_llama(none, 0, ("CUDA",), "no CUDA-capable device is detected")[1] == (
        "llama.cpp is built for CUDA but finds no usable GPU (no CUDA-capable device is detected): running on the CPU")


def replace_gpus(hw: Hardware, gpus) -> Hardware:
    from dataclasses import replace

    return replace(hw, gpus=gpus)


def test_a_cuda_build_without_a_usable_gpu_plans_and_runs_on_the_cpu(models, monkeypatch, capsys):
    """llama.cpp's device list faked at the boundary: a CUDA build whose driver is too old registers
    the CUDA backend but no device, while NVML still sees the card."""
    from moelocal.commands import _run

    cpu_only = [d for d in native.devices() if d.kind == "cpu"]
    monkeypatch.setattr(native, "devices", lambda: cpu_only)
    real_fn = native._fn
    monkeypatch.setattr(native, "_fn", lambda name: (lambda b: 1 if b == b"CUDA" else real_fn(name)(b))
                        if name == "ggml_backend_reg_by_name" else real_fn(name))
    assert _run.llama_gpu_facts()[:2] == (0, ("CUDA",))
    path = models["qwen3moe-q8_0"]
    summary = read_summary(path)
    card = gpu_machine(80 * GiB)  # what NVML reports: a GPU this llama.cpp cannot reach
    with _run.load_engine(path, summary, PlacementFlags(), ctx=N_CTX, threads=1, hw=card) as e:
        assert e.plan.placement == Placement() and e.memory.keys() == {CPU}
        assert "".join(c.text for c in e.generate("hi", _run.sampling(temp=0, top_p=1, seed=1, max_tokens=4)))
    err = " ".join(capsys.readouterr().err.split())  # the console wraps long lines
    assert err == "Warning: llama.cpp (CUDA) can use 0 of the 1 GPU(s) here: planning and running on the CPU"


def test_ngl_beyond_the_layers_is_every_layer_as_in_llama_cpp():
    s = qwen3moe_summary()
    hw = gpu_machine(80 * GiB)
    asked = planner.forced_placement(s, hw, n_gpu_layers=999)
    result = planner.fit(s, hw, RunOptions(n_ctx=4096), asked=asked)
    assert asked.n_gpu_layers == s.n_layer + 1 and result.asked == result.recommended == 0
