"""`moelocal generate` and `moelocal batch` as a user runs them: real processes, real llama.cpp."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from moelocal.commands._run import PlacementFlags, build_plan
from moelocal.errors import DoesNotFitError, UsageError
from moelocal.gguf_model import read_summary
from moelocal.hardware import GPU, GiB, Hardware

FAST = ("--threads", "1", "--ctx", "512")
RECORD_KEYS = {"id", "content", "reasoning", "text", "prompt_tokens", "completion_tokens", "finish_reason", "seconds"}


def moelocal(*args: str, input: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moelocal", *args], input=input, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def model(models) -> str:
    return str(models["qwen3moe-q8_0"])


# ---- generate --------------------------------------------------------------------------------


def test_generate_same_seed_same_text_another_seed_differs(model):
    args = ("generate", model, "-p", "Tell me about the sea.", "-n", "20", "--ignore-eos", *FAST)
    a = moelocal(*args, "--seed", "5", "--json")
    b = moelocal(*args, "--seed", "5", "--json")
    c = moelocal(*args, "--seed", "6", "--json")
    assert a.returncode == b.returncode == c.returncode == 0, a.stderr
    ra, rb, rc = (json.loads(r.stdout) for r in (a, b, c))
    assert ra["text"] == rb["text"] != rc["text"]
    assert (ra["completion_tokens"], ra["finish_reason"], ra["seed"]) == (20, "length", 5)
    assert ra["prompt_tokens"] > 5 and ra["generation_tps"] > 0
    plain = moelocal(*args, "--seed", "5")
    assert plain.returncode == 0
    assert plain.stdout == ra["text"] + "\n"  # stdout is not a terminal: the text alone


def test_generate_reads_the_prompt_from_stdin(model):
    args = ("generate", model, "--raw", "--seed", "2", "-n", "12", "--ignore-eos", "--json", *FAST)
    piped = moelocal(*args, input="Once upon a time")
    given = moelocal(*args, "-p", "Once upon a time")
    assert piped.returncode == given.returncode == 0, piped.stderr
    assert json.loads(piped.stdout)["text"] == json.loads(given.stdout)["text"]


@pytest.mark.parametrize("command", ["generate", "batch", "chat"])
def test_a_bad_model_path_is_one_error_line_and_exit_2(tmp_path, command):
    missing = tmp_path / "nope.gguf"
    run = moelocal(command, str(missing), *(["-p", "hi"] if command == "generate" else []), input="")
    assert run.returncode == 2
    assert run.stderr == f"Error: {missing} does not exist (check the path, or give a Hugging Face repo as org/name)\n"
    assert run.stdout == ""


def test_a_file_that_is_not_gguf_is_exit_2(tmp_path):
    bad = tmp_path / "notes.gguf"
    bad.write_text("hello, not a model\n")
    run = moelocal("generate", str(bad), "-p", "hi")
    assert run.returncode == 2
    assert run.stderr.startswith("Error: notes.gguf is not a GGUF model") and run.stderr.count("\n") == 1


def test_an_empty_prompt_is_a_usage_error(model):
    run = moelocal("generate", model, input="   \n")
    assert (run.returncode, run.stderr) == (2, "Error: the prompt is empty (give one with -p TEXT or on stdin)\n")


@pytest.fixture(scope="module")
def thinking_model(llama_assets, tmp_path_factory) -> str:
    """The qwen3moe test model with Qwen3.5's real template, which opens <think> in the generation prompt:
    all the (random) model writes is thinking, unless enable_thinking is false."""
    from moelocal import testmodels

    template = (llama_assets / "models" / "templates" / "Qwen3.5-4B.jinja").read_text(encoding="utf-8")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(testmodels, "CHATML_TEMPLATE", template)  # what the writer puts in tokenizer.chat_template
        path = testmodels.write_model("qwen3moe", tmp_path_factory.mktemp("thinking") / "qwen35-think.gguf")
    return str(path)


def test_generate_keeps_the_thinking_off_stdout(thinking_model):
    args = ("generate", thinking_model, "-p", "Hi", "-n", "12", "--ignore-eos", "--seed", "4", *FAST)
    rec = json.loads(moelocal(*args, "--json").stdout)
    assert rec["content"] == "" and rec["reasoning"] and rec["reasoning"] == rec["text"].strip()
    assert rec["completion_tokens"] == 12
    plain = moelocal(*args)
    assert plain.returncode == 0 and plain.stdout == "\n"  # the answer alone: all 12 tokens were thinking
    shown = moelocal(*args, "--show-reasoning")
    assert shown.stdout == "\n" and rec["reasoning"] in shown.stderr  # the thinking on stderr
    off = json.loads(moelocal(*args, "--no-think", "--json").stdout)
    assert off["reasoning"] == "" and off["content"] == off["text"].strip() and off["content"]
    assert off["prompt_tokens"] > rec["prompt_tokens"]  # the prompt closed the block: <think>\n\n</think>
    effort = moelocal(*args, "--reasoning-effort", "low", "--json")
    assert "takes no reasoning_effort; --reasoning-effort is ignored" in effort.stderr.replace("\n", "")
    assert json.loads(effort.stdout)["reasoning"] == rec["reasoning"]


def test_a_json_schema_answer_of_a_thinking_model_is_the_content(thinking_model, tmp_path):
    schema = tmp_path / "s.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}))
    run = moelocal("generate", thinking_model, "-p", "Hi", "--json-schema", str(schema), "--json", "-n", "40",
                   "--seed", "1", *FAST)
    assert run.returncode == 0, run.stderr
    rec = json.loads(run.stdout)
    assert rec["reasoning"] == "" and isinstance(json.loads(rec["content"])["a"], int)


HELLO = "Hello! How can I help you today?"
GREETED = "The user greets me. I will greet them back."
WEATHER_TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


@pytest.mark.parametrize("family", ["qwen3", "gpt-oss"])
def test_generate_a_scripted_thinking_model(scripted_models, family):
    args = ("generate", str(scripted_models[family]), "-p", "Hi there!", "--temp", "0", "--threads", "1",
            "--ctx", "2048")
    plain = moelocal(*args)
    assert (plain.returncode, plain.stdout, plain.stderr) == (0, HELLO + "\n", "")
    shown = moelocal(*args, "--show-reasoning")
    assert (shown.stdout, shown.stderr) == (HELLO + "\n", GREETED + "\n")
    rec = json.loads(moelocal(*args, "--json").stdout)
    assert (rec["content"], rec["reasoning"], rec["finish_reason"]) == (HELLO, GREETED, "stop")
    assert rec["text"].endswith(HELLO) and GREETED in rec["text"] and rec["text"] != HELLO


@pytest.mark.parametrize("family", ["qwen3", "gpt-oss"])
def test_batch_a_scripted_model_calls_the_tool_then_answers(scripted_models, family):
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = moelocal("batch", str(scripted_models[family]), "--temp", "0", "--threads", "1", "--ctx", "2048",
                     input=json.dumps({"id": 1, "messages": ask, "tools": WEATHER_TOOLS}) + "\n")
    rec = json.loads(first.stdout)
    assert rec["finish_reason"] == "tool_calls" and rec["content"] == ""
    assert rec["reasoning"] == "The user wants the weather in Paris. I should call get_weather."
    [call] = rec["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert (call["function"]["name"], json.loads(call["function"]["arguments"])) == ("get_weather", {"city": "Paris"})
    # the call and its result go back in, through the template, and the model answers
    history = ask + [{"role": "assistant", "content": None, "tool_calls": [call]},
                     {"role": "tool", "tool_call_id": call["id"], "content": '{"sky": "sunny", "celsius": 18}'}]
    second = moelocal("batch", str(scripted_models[family]), "--temp", "0", "--threads", "1", "--ctx", "2048",
                      input=json.dumps({"id": 2, "messages": history, "tools": WEATHER_TOOLS}) + "\n")
    rec = json.loads(second.stdout)
    assert (rec["content"], rec["reasoning"], rec["tool_calls"], rec["finish_reason"]) == (
        "It is sunny in Paris, 18 degrees.", "The tool says it is sunny and warm.", [], "stop")


def test_batch_records_carry_content_reasoning_and_tool_calls(thinking_model):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]
    ask = [{"role": "user", "content": "Weather in Paris?"}]
    lines = [json.dumps({"id": "think", "messages": ask}),
             json.dumps({"id": "tools", "messages": ask, "tools": tools}),
             json.dumps({"id": "off", "messages": ask, "enable_thinking": False}),
             json.dumps({"id": "bad", "messages": ask, "tools": [{"function": {}}]}),
             json.dumps({"id": "round", "messages": ask + [
                 {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
                     "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                 {"role": "tool", "tool_call_id": "c1", "content": "sunny"}], "tools": tools})]
    run = moelocal("batch", thinking_model, "--seed", "1", "-n", "8", "--ignore-eos", "--threads", "1", "--ctx", "2048",
                   input="\n".join(lines) + "\n")
    assert run.returncode == 0, run.stderr
    recs = {r["id"]: r for r in map(json.loads, run.stdout.splitlines())}
    assert set(recs["think"]) == RECORD_KEYS and recs["think"]["content"] == "" and recs["think"]["reasoning"]
    assert set(recs["tools"]) == RECORD_KEYS | {"tool_calls"} and recs["tools"]["tool_calls"] == []
    assert recs["tools"]["prompt_tokens"] > recs["think"]["prompt_tokens"] + 20  # the tools are in the prompt
    assert recs["off"]["reasoning"] == "" and recs["off"]["content"]
    assert recs["bad"]["error"].startswith('line 4: "tools" must be a list of')
    assert recs["round"]["finish_reason"] == "length" and recs["round"]["prompt_tokens"] > \
        recs["tools"]["prompt_tokens"]


def test_generated_text_carries_the_special_tokens(model):
    """The formats' parsers read markup that is special tokens (harmony's <|channel|>): the engine renders them."""
    from moelocal.engine import Engine
    from moelocal.formats import ChatFormat
    from moelocal.testmodels import special_token_id

    plan = build_plan(read_summary(model), PlacementFlags(), ctx=256, threads=1)
    with Engine.load(model, plan) as engine:
        token = special_token_id("<|im_start|>")
        assert engine.tokenize("<|im_start|>", add_special=False) == [token]
        assert engine.token_bytes(token) == b"<|im_start|>"
        assert engine.token_bytes(token, special=False) == b""  # what llama.cpp's special=False did
        assert engine.chat_format == ChatFormat()  # a ChatML model: plain text, nothing to take apart
        assert set(engine.special_tokens) >= {"<|im_start|>", "<|im_end|>", "<|endoftext|>"}


# ---- batch -----------------------------------------------------------------------------------


def test_batch_writes_a_record_per_line_and_bad_lines_become_errors(model, tmp_path):
    lines = [
        json.dumps({"id": "a", "prompt": "The cat sat", "max_tokens": 6}),
        "this is not json",
        json.dumps({"id": "b", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}),
        json.dumps({"id": "c"}),
        json.dumps({"id": "a", "prompt": "again"}),
        json.dumps({"id": 4, "prompt": "x", "top_p": 2}),
        json.dumps({"id": 5, "prompt": "The sea", "temperature": 0}),
    ]
    run = moelocal("batch", model, "--seed", "1", "-n", "5", "--ignore-eos", *FAST, input="\n".join(lines) + "\n")
    assert run.returncode == 0, run.stderr
    records = [json.loads(x) for x in run.stdout.splitlines()]
    errors = [r for r in records if "error" in r]
    assert errors == [
        {"id": None, "line": 2, "error": "line 2 is not JSON: Expecting value", "finish_reason": "error"},
        {"id": "c", "line": 4, "error": 'line 4 needs either "prompt" or "messages"', "finish_reason": "error"},
        {"id": "a", "line": 5, "error": "line 5 repeats id 'a'", "finish_reason": "error"},
        {"id": 4, "line": 6, "error": "line 6: top_p must be in (0, 1], got 2", "finish_reason": "error"},
    ]
    done = {r["id"]: r for r in records if "error" not in r}
    assert set(done) == {"a", "b", 5}
    assert all(set(r) == RECORD_KEYS for r in done.values())
    assert {k: (r["completion_tokens"], r["finish_reason"]) for k, r in done.items()} == {
        "a": (6, "length"), "b": (4, "length"), 5: (5, "length")
    }


def test_an_interrupted_batch_resumes_with_no_id_lost_or_repeated(model, tmp_path):
    ids = [f"q{i}" for i in range(8)]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": i, "prompt": f"Question {i}: what is the sea?"}) + "\n" for i in ids))
    out = tmp_path / "out.jsonl"
    args = ("batch", model, str(src), "--seed", "3", "-n", "400", "--ignore-eos", *FAST)
    proc = subprocess.Popen([sys.executable, "-m", "moelocal", *args, "-o", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not out.exists() or out.read_text().count("\n") < 2):
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)  # no chance to clean up: the worst interruption
    proc.wait()
    first = [json.loads(x)["id"] for x in out.read_text().splitlines()]
    assert 2 <= len(first) < len(ids), "the batch finished before it could be interrupted"
    resumed = moelocal(*args, "-o", str(out), "--parallel", "3")
    assert resumed.returncode == 0, resumed.stderr
    assert f"{len(first)} of 8 requests are already in" in resumed.stderr
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted(r["id"] for r in records) == sorted(ids)  # every id exactly once
    # and the same answers as a run that was never interrupted (one request at a time)
    whole = moelocal(*args, "--parallel", "1")
    assert {r["id"]: r["text"] for r in records} == {
        r["id"]: r["text"] for r in map(json.loads, whole.stdout.splitlines())
    }
    again = moelocal(*args, "-o", str(out))
    assert again.returncode == 0 and out.read_text().count("\n") == len(ids)


def test_a_record_cut_short_by_a_kill_is_run_again(model, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"id": 1, "prompt": "one"}) + "\n" + json.dumps({"id": 2, "prompt": "two"}) + "\n")
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps({"id": 1, "text": "x", "prompt_tokens": 1, "completion_tokens": 1,
                               "finish_reason": "stop", "seconds": 0.1}) + '\n{"id": 2, "te')
    run = moelocal("batch", model, str(src), "-o", str(out), "-n", "3", *FAST)
    assert run.returncode == 0, run.stderr
    lines = out.read_text().splitlines()
    assert lines[1] == '{"id": 2, "te'  # left as it was, ignored
    assert [json.loads(x)["id"] for x in (lines[0], lines[2])] == [1, 2]


# ---- placement flags -------------------------------------------------------------------------


def small_machine(ram: int, vram: int) -> Hardware:
    gpu = GPU(name="test gpu", total=vram, free=vram, bandwidth=500e9, tflops=50e12)
    return Hardware(cpu_name="test cpu", cpu_cores=2, ram_total=ram, ram_available=ram, cpu_bandwidth=20e9,
                    gpus=(gpu,), cpu_flops=80e9)


def test_forced_placement_that_does_not_fit_is_refused_without_force(models, capsys):
    summary = read_summary(models["qwen3moe-q8_0"])
    hw = small_machine(ram=1 << 20, vram=1 << 20)
    flags = PlacementFlags(n_cpu_moe=2)
    with pytest.raises(DoesNotFitError) as err:
        build_plan(summary, flags, ctx=256, threads=1, hw=hw)
    assert err.value.message.startswith(f"the placement you asked for does not fit {summary.name}: it needs ")
    assert err.value.hint == "drop the placement flags to let moelocal choose, or add --force to try"
    plan = build_plan(summary, PlacementFlags(n_cpu_moe=2, force=True), ctx=256, threads=1, hw=hw)
    assert not plan.fits and plan.placement.n_cpu_moe == 2 and plan.placement.devices == ("gpu0",)
    assert "trying anyway (--force)" in capsys.readouterr().err


def test_forced_placement_that_fits_is_used_as_given(models):
    summary = read_summary(models["qwen3moe-q8_0"])
    plan = build_plan(summary, PlacementFlags(n_cpu_moe=3), ctx=256, threads=1, hw=small_machine(8 * GiB, 8 * GiB))
    assert plan.fits and plan.placement.n_cpu_moe == 3
    assert plan.placement.tensor_overrides[0][0] == r"blk\.0\.ffn_(up|down|gate|gate_up)_(ch|)exps"
    assert (plan.options.n_ctx, plan.options.n_threads) == (256, 1)


def test_contradicting_placement_flags_are_usage_errors(models):
    summary = read_summary(models["qwen3moe-q8_0"])
    hw = small_machine(8 * GiB, 8 * GiB)
    with pytest.raises(UsageError, match="--cpu-moe and --n-cpu-moe contradict each other"):
        build_plan(summary, PlacementFlags(cpu_moe=True, n_cpu_moe=2), ctx=256, threads=1, hw=hw)
    with pytest.raises(UsageError, match="unknown --plan 'fast'"):
        build_plan(summary, PlacementFlags(plan="fast"), ctx=256, threads=1, hw=hw)


def test_placement_flags_on_the_command_line_run_the_model(model):
    run = moelocal("generate", model, "-p", "hi", "-n", "3", "--n-cpu-moe", "2", "--json", *FAST)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["completion_tokens"] <= 3


def test_help_has_examples():
    run = moelocal("batch", "--help")
    assert run.returncode == 0 and "moelocal batch model.gguf prompts.jsonl -o answers.jsonl --seed 1" in run.stdout
