"""`moelocal bench` and this machine's calibration: measured, recorded, and then used by `fit`.

Nothing here asserts how fast this machine is: the tests check that the numbers bench measures go
into the calibration file under the machine's key, that fit's predictions then come from them (and
say so), that they move each prediction of the benched model toward what was measured, and that
runs add to the record unless MOELOCAL_NO_CALIBRATE is set.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
from typer.testing import CliRunner

from moelocal import calibration, cli, config, hardware, speed
from moelocal.cli import app
from moelocal.gguf_model import read_summary
from moelocal.plan import Placement, RunOptions

FAST = ["-p", "64", "-n", "16", "-r", "2", "-d", "0", "-d", "128"]
UNCALIBRATED = "from the RAM bandwidth measured here"  # speed.basis_text without a calibration


def invoke(*args: str):
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result


def basis_of_fit(path) -> str:
    data = json.loads(invoke("fit", str(path), "--ctx", "512", "--json").stdout)
    return data["plans"][data["recommended"]]["predicted"]["basis"]


def test_bench_measures_records_and_fit_then_predicts_from_it(models):
    a, b = models["qwen3moe-q8_0"], models["gpt-oss-q8_0"]
    hw = hardware.detect()
    assert hw.calibration is None and calibration.records(hw) == []
    assert basis_of_fit(b) == UNCALIBRATED

    data = json.loads(invoke("bench", str(a), *FAST, "--json").stdout)
    assert [r["test"] for r in data["results"]] == ["pp64", "tg16", "pp64 @ d128", "tg16 @ d128"]
    assert all(r["tps"] > 0 and r["predicted"] > 0 for r in data["results"])
    assert all(r["ratio"] == round(r["tps"] / r["predicted"], 3) for r in data["results"])
    assert data["predicted_from"] == UNCALIBRATED and data["recorded"] is True
    assert data["machine"] == calibration.key(hw) and f"llama.cpp {calibration.llama_cpp_version()}" in data["machine"]

    # the record, under this machine's key, in moelocal's app dir
    saved = json.loads((config.app_dir() / "calibration" / "calibration.json").read_text())
    entry = saved["machines"][calibration.key(hw)]
    assert entry["machine"]["cpu"] == hw.cpu_name and entry["machine"]["backend"] == "cpu"
    (rec,) = entry["records"]
    assert (rec["source"], rec["model"], rec["placement"]) == ("bench", "moelocal test qwen3moe", "CPU only")
    assert set(rec["factors"]) == {"cpu_decode_eff", "cpu_prefill_eff"}

    # detection now carries the calibration; fit predicts from it and says so
    cal = hardware.detect().calibration
    assert (cal.runs, cal.cpu_decode_eff, cal.cpu_prefill_eff) == (1, rec["factors"]["cpu_decode_eff"],
                                                                   rec["factors"]["cpu_prefill_eff"])
    assert data["calibration"]["runs"] == 1 and data["plan_now"]["basis"] == "calibrated on this machine, 1 run"
    assert basis_of_fit(b) == "calibrated on this machine, 1 run"
    fitted = json.loads(invoke("fit", str(b), "--ctx", "512", "--json").stdout)
    best = fitted["plans"][fitted["recommended"]]
    sb = read_summary(b)
    opts = RunOptions(**best["options"])
    base = replace(hardware.detect(), calibration=None)
    assert best["predicted"]["decode_tps"] == speed.predict(sb, Placement(), opts, replace(base, calibration=cal)
                                                            ).decode_tps
    assert best["predicted"]["decode_tps"] != speed.predict(sb, Placement(), opts, base).decode_tps

    # for the model it measured, the calibrated predictions move toward what was measured at the
    # shortest context (a filled one adds attention work the model does not price, and is left out of
    # the factors): prompt speed lands on it; decode moves the way the measurement points
    sa = read_summary(a)
    cal_hw = replace(base, calibration=cal)
    plan_opts = RunOptions(**data["options"])
    logs: dict[str, list[tuple[float, float]]] = {"prompt": [], "decode": []}
    for r in data["results"]:
        o = calibration.at_depth(plan_opts, r["depth"] + r["n_tokens"] // 2, r["n_tokens"] if r["kind"] == "prompt"
                                 else None)
        key = "prefill_tps" if r["kind"] == "prompt" else "decode_tps"
        before = getattr(speed.predict(sa, Placement(), o, base), key)
        after = getattr(speed.predict(sa, Placement(), o, cal_hw), key)
        assert before == pytest.approx(r["predicted"], rel=1e-6)
        if r["depth"] == 0:
            logs[r["kind"]].append((math.log(r["tps"] / before), math.log(after / before)))
    assert len(logs["prompt"]) == len(logs["decode"]) == 1
    (off, moved), = logs["prompt"]
    assert moved == pytest.approx(off, abs=0.01)
    (off, moved), = logs["decode"]
    assert abs(off) < 0.1 or (moved > 0) == (off > 0)

    # a second bench adds a run; --reset forgets them all
    invoke("bench", str(b), *FAST, "--json")
    assert hardware.detect().calibration.runs == 2 and basis_of_fit(a) == "calibrated on this machine, 2 runs"
    gone = json.loads(invoke("bench", "--reset", "--json").stdout)
    assert gone == {"reset": True, "records": 2, "machine": calibration.key(hw)}
    assert hardware.detect().calibration is None and basis_of_fit(b) == UNCALIBRATED


def test_describing_another_machine_leaves_the_calibration_out(models):
    hw = hardware.detect()
    calibration.add(hw, calibration.Record("bench", "m", "CPU only", {"cpu_decode_eff": 0.5, "cpu_prefill_eff": 2.0}))
    path = str(models["qwen3moe-q8_0"])
    assert basis_of_fit(path) == "calibrated on this machine, 1 run"
    data = json.loads(invoke("fit", path, "--ctx", "512", "--cpu-bw", "80GB/s", "--json").stdout)
    assert data["plans"][data["recommended"]]["predicted"]["basis"] == "from rated bandwidths"
    no_gpu = json.loads(invoke("fit", path, "--ctx", "512", "--no-gpu", "--json").stdout)
    assert no_gpu["plans"][no_gpu["recommended"]]["predicted"]["basis"] == "calibrated on this machine, 1 run"


def test_records_combine_robustly_and_a_broken_file_is_no_calibration():
    hw = hardware.detect()
    for eff in (0.25, 1.0):
        calibration.add(hw, calibration.Record("bench", "m", "CPU only", {"cpu_decode_eff": eff}))
    calibration.add(hw, calibration.Record("generate", "m", "CPU only", {"cpu_prefill_eff": 3.0}, session="s1"))
    calibration.add(hw, calibration.Record("generate", "m", "CPU only", {"cpu_prefill_eff": 2.0}, session="s1"))
    cal = calibration.load(hw)
    assert (cal.cpu_decode_eff, cal.cpu_prefill_eff, cal.runs) == (0.5, 2.0, 3)  # one session: one record
    assert cal.source.startswith("moelocal bench, generate, ")
    calibration.add(hw, calibration.Record("chat", "m", "CPU only", {"cpu_decode_eff": 0.01}))  # a busy moment
    assert calibration.load(hw).cpu_decode_eff == 0.25  # the median of 0.01, 0.25 and 1.0
    calibration.path().write_text("{not json")
    assert calibration.load(hw) is None and hardware.detect().calibration is None


def test_runs_add_what_they_measure_unless_told_not_to(models, monkeypatch):
    path = str(models["qwen3moe-q8_0"])
    args = ["generate", path, "-p", "hello there", "-n", "40", "--ignore-eos", "--temp", "0", "--ctx", "256"]
    monkeypatch.setenv("MOELOCAL_NO_CALIBRATE", "1")
    invoke(*args)
    assert calibration.records(hardware.detect()) == []
    monkeypatch.delenv("MOELOCAL_NO_CALIBRATE")
    monkeypatch.setattr("sys.argv", ["moelocal", "generate"])
    invoke(*args)
    (rec,) = calibration.records(hardware.detect())
    assert (rec["source"], rec["model"]) == ("generate", "moelocal test qwen3moe")
    assert set(rec["factors"]) == {"cpu_decode_eff"}  # 40 tokens decoded; a prompt this short says nothing
    invoke(*args, "-t", "1")  # not llama.cpp's default threads: not recorded
    assert len(calibration.records(hardware.detect())) == 1 or hardware.default_threads() == 1


def test_bench_checks_its_arguments(models, capsys):
    def run(*args: str) -> tuple[int, str]:
        try:
            cli.main(list(args))
            code = 0
        except SystemExit as exc:
            code = exc.code or 0
        return code, capsys.readouterr().err

    path = str(models["qwen3moe-q8_0"])
    assert run("bench", path, "-r", "0") == (2, "Error: --repetitions must be at least 1, got 0\n")
    assert run("bench", path, "-d", "4000", "--ctx", "1024") == (
        2, "Error: --ctx 1024 cannot hold a depth of 4000 and 512 more tokens (use --ctx 4513 or more, or a smaller "
        "--depth)\n")
