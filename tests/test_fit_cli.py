"""`moelocal fit` on local files, through the real command: output, JSON, exit codes."""

from __future__ import annotations

import json
import shutil

import pytest

from moelocal import cli, planner
from moelocal.gguf_model import read_summary


def run(capsys, *args: str) -> tuple[int, str, str]:
    try:
        cli.main(list(args))
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    out, err = capsys.readouterr()
    return code, out, err


def test_fit_json_for_a_local_model_on_a_described_machine(models, capsys):
    path = models["qwen3moe-q8_0"]
    code, out, _ = run(capsys, "fit", str(path), "--no-gpu", "--ram", "8GiB", "--ctx", "2048", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["model"]["architecture"] == "qwen3moe"
    assert data["hardware"]["ram"]["available"] == 8 << 30
    assert data["hardware"]["gpus"] == []
    best = data["plans"][data["recommended"]]
    assert best["placement"]["n_gpu_layers"] == 0 and best["fits"] is True
    mem = best["memory"]["cpu"]
    assert mem["weights"] == read_summary(path).tensor_bytes
    assert mem["total"] == mem["weights"] + mem["kv"] + mem["compute"] + mem["output"] + mem["overhead"]
    assert data["verdict"] == "fits in RAM, runs on the CPU"
    assert data["llama_cpp_flags"] == ["-ngl", "0", "-c", "2048", "-fa", "on"]


def test_fit_says_what_is_missing_and_exits_3_when_nothing_fits(models, capsys):
    path = models["qwen3moe-f16"]
    code, out, err = run(capsys, "fit", str(path), "--no-gpu", "--ram", "260MiB", "--ctx", "4096")
    assert code == 3
    assert "verdict: moelocal test qwen3moe does not fit: needs " in out
    assert "more RAM" in out
    code, out, _ = run(capsys, "fit", str(path), "--no-gpu", "--ram", "260MiB", "--ctx", "4096", "--json")
    data = json.loads(out)
    assert code == 3 and data["recommended"] is None and data["llama_cpp_flags"] is None


def test_fit_with_a_gpu_recommends_all_on_gpu_and_prints_flags(models, capsys):
    path = models["qwen3moe-q4_k"]
    code, out, _ = run(capsys, "fit", str(path), "--vram", "24GiB", "--ram", "32GiB", "--gpu-bw", "900GB/s",
                       "--ctx", "4096")
    assert code == 0
    assert "verdict: moelocal test qwen3moe fits on the GPU" in out
    assert f"llama-server -m {path} -ngl 5 -c 4096 -fa on" in out


def test_fit_ranks_the_quantizations_in_a_folder(models, tmp_path, capsys):
    for key in ("qwen3moe-f16", "qwen3moe-q8_0", "qwen3moe-q4_k"):
        shutil.copy(models[key], tmp_path / models[key].name)
    code, out, _ = run(capsys, "fit", str(tmp_path), "--no-gpu", "--ram", "8GiB", "--ctx", "1024", "--json")
    assert code == 0
    data = json.loads(out)
    names = [m["model"]["quantization"] for m in data["models"]]
    assert sorted(names) == ["F16", "Q4_K", "Q8_0"]
    # all fit and the tiny models are fast: the most bits per weight wins
    assert names[data["recommended_model"]] == "F16"
    # with RAM only for the Q4_K file's needs, Q4_K is the one that fits
    q4 = next(m for m in data["models"] if m["model"]["quantization"] == "Q4_K")
    q8 = next(m for m in data["models"] if m["model"]["quantization"] == "Q8_0")
    need_q4 = q4["plans"][q4["recommended"]]["memory"]["cpu"]["total"]
    need_q8 = q8["plans"][q8["recommended"]]["memory"]["cpu"]["total"]
    assert need_q4 < need_q8
    ram = need_q4 + planner.MIN_RAM_MARGIN + 4096  # small enough that the margin is the 256 MiB minimum
    assert need_q8 > need_q4 + 4096
    code, out, _ = run(capsys, "fit", str(tmp_path), "--no-gpu", "--ram", f"{ram}B", "--ctx", "1024", "--json")
    data = json.loads(out)
    assert code == 0
    assert data["models"][data["recommended_model"]]["model"]["quantization"] == "Q4_K"


def test_fit_reduces_the_context_only_when_none_was_asked_for(models, capsys):
    path = models["llama-moe-f16"]
    summary = read_summary(path)
    full = planner.default_ctx(summary)
    assert full == 4096
    # RAM for the model at 2048 tokens of context but not at 4096
    from moelocal import hardware
    from moelocal.plan import Placement, RunOptions

    hw = hardware.with_overrides(hardware.detect(probe=False), no_gpu=True, ram="64GiB")
    need = {n: planner.make_plan(summary, Placement(), RunOptions(n_ctx=n), hw).memory["cpu"].total
            for n in (2048, 4096)}
    assert need[2048] < need[4096]
    ram = need[2048] + planner.MIN_RAM_MARGIN + 4096
    assert ram - max(planner.MIN_RAM_MARGIN, planner.RAM_MARGIN * ram) < need[4096]
    code, out, err = run(capsys, "fit", str(path), "--no-gpu", "--ram", f"{ram}B", "--json")
    data = json.loads(out)
    assert code == 0
    assert data["plans"][data["recommended"]]["options"]["n_ctx"] == 2048
    assert data["notes"] == ["context reduced from 4096 to 2048 tokens so that the model fits"]
    code, _, _ = run(capsys, "fit", str(path), "--no-gpu", "--ram", f"{ram}B", "--ctx", "4096", "--json")
    assert code == 3


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--vram", "12XB"], "Error: cannot read --vram '12XB' (write it like 24GiB, 16GB or 512MiB)"),
        (["--kv-type", "q3"], "Error: unknown --kv-type 'q3' (use f16, q8_0 or q4_0)"),
        (["--ubatch", "0"], "Error: --ubatch must be positive, got 0"),
    ],
)
def test_fit_refuses_bad_options_in_one_line(models, capsys, args, message):
    code, out, err = run(capsys, "fit", str(models["qwen3moe-q8_0"]), *args)
    assert code == 2 and out == ""
    assert err.strip() == message


def test_fit_on_a_missing_file_is_one_line(capsys, tmp_path):
    code, out, err = run(capsys, "fit", str(tmp_path / "nope.gguf"))
    assert code == 2
    assert err.strip() == f"Error: {tmp_path / 'nope.gguf'} does not exist (check the path, or give a Hugging Face " \
                          "repo as org/name)"
