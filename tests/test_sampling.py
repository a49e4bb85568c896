"""Sampling as model authors recommend it, and structured output: real llama.cpp samplers on test models.

- a GGUF's general.sampling.* keys become the defaults of a run, and the user's values win;
- repeat, presence and frequency penalties reach llama.cpp's penalties sampler;
- a JSON schema becomes a llama.cpp grammar (llama-cpp-python's converter) that decoding obeys.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moelocal import grammar, testmodels
from moelocal.cli import app
from moelocal.commands._run import sampling_line
from moelocal.engine import Engine, SamplingParams, recommended_sampling
from moelocal.errors import UsageError
from moelocal.plan import Placement, Plan, Prediction, RunOptions
from moelocal.source import demo_model_path

RECOMMENDED = {"temp": 0.6, "top_k": 20, "top_p": 0.9, "min_p": 0.0, "penalty_repeat": 1.1, "penalty_last_n": 128}
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer"},
        "happy": {"type": "boolean"},
        "pets": {"type": "array", "items": {"enum": ["cat", "dog", "fish"]}, "maxItems": 3},
    },
    "required": ["name", "age", "happy", "pets"],
    "additionalProperties": False,
}
# A random-weight model also draws lone UTF-8 bytes, which llama.cpp's grammar counts as characters;
# an ASCII pattern keeps its strings valid text.
ASCII_NAME = {"type": "string", "pattern": "^[A-Za-z ]{1,16}$"}
ASCII_PERSON = {**PERSON, "properties": {**PERSON["properties"], "name": ASCII_NAME}}


def cpu_plan(n_ctx: int = 512) -> Plan:
    return Plan(placement=Placement(), options=RunOptions(n_ctx=n_ctx, n_threads=1), memory={}, budget={},
                predicted=Prediction(0, 0), fits=True)


@pytest.fixture(scope="module")
def recommending_model(tmp_path_factory) -> Path:
    """qwen3moe with the sampling keys a newer convert_hf_to_gguf writes from generation_config.json."""
    original = testmodels._write_metadata

    def with_sampling(w, spec, dtype):
        original(w, spec, dtype)
        w.add_sampling_temp(RECOMMENDED["temp"])
        w.add_sampling_top_k(RECOMMENDED["top_k"])
        w.add_sampling_top_p(RECOMMENDED["top_p"])
        w.add_sampling_min_p(RECOMMENDED["min_p"])
        w.add_sampling_penalty_repeat(RECOMMENDED["penalty_repeat"])
        w.add_sampling_penalty_last_n(RECOMMENDED["penalty_last_n"])

    path = tmp_path_factory.mktemp("sampling") / "qwen3moe-recommends.gguf"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(testmodels, "_write_metadata", with_sampling)
        testmodels.write_model("qwen3moe", path)
    return path


@pytest.fixture(scope="module")
def qwen(models):
    with Engine.load(models["qwen3moe-q8_0"], cpu_plan()) as engine:
        yield engine


# ---- the model's recommendation ------------------------------------------------------------------


def test_recommendation_is_read_as_llama_cpp_prints_it():
    meta = {"general.sampling.temp": "0.700000", "general.sampling.top_k": "20", "general.sampling.top_p": "x",
            "general.name": "m"}
    assert recommended_sampling(meta) == {"temperature": 0.7, "top_k": 20}  # "x" is skipped, as llama.cpp does


def test_a_gguf_with_sampling_keys_sets_the_defaults_and_user_values_win(recommending_model):
    with Engine.load(recommending_model, cpu_plan()) as e:
        assert e.recommended == {"temperature": pytest.approx(0.6), "top_k": 20, "top_p": pytest.approx(0.9),
                                 "min_p": 0.0, "repeat_penalty": pytest.approx(1.1), "penalty_last_n": 128}
        p = e.sampling(SamplingParams())
        assert (p.temperature, p.top_k, p.top_p, p.min_p, p.repeat_penalty, p.penalty_last_n) == pytest.approx(
            (0.6, 20, 0.9, 0.0, 1.1, 128))
        mine = e.sampling(SamplingParams(temperature=1.0, top_k=0, repeat_penalty=1.0))
        assert (mine.temperature, mine.top_k, mine.repeat_penalty, mine.top_p) == pytest.approx((1.0, 0, 1.0, 0.9))
        assert sampling_line(e, SamplingParams(temperature=1.0)) == (
            "temp 1 · top-k 20 · top-p 0.9 · min-p 0 · repeat 1.1 (last 128) "
            "(top-k, top-p, min-p, repeat, last n from the model)")


def test_without_keys_the_defaults_are_llama_cpps(qwen):
    assert qwen.recommended == {}
    p = qwen.sampling(SamplingParams())
    assert (p.temperature, p.top_k, p.top_p, p.min_p, p.repeat_penalty, p.penalty_last_n) == (0.8, 40, 0.95, 0.05,
                                                                                              1.0, 64)
    assert sampling_line(qwen, SamplingParams(presence_penalty=0.5)) == (
        "temp 0.8 · top-k 40 · top-p 0.95 · min-p 0.05 · repeat 1 (last 64) · presence 0.5 · frequency 0")


@pytest.mark.parametrize(("params", "message"), [
    (SamplingParams(repeat_penalty=0), "repeat_penalty must be above 0 (1 is off), got 0"),
    (SamplingParams(presence_penalty=2.5), "presence_penalty must be in [-2, 2], got 2.5"),
    (SamplingParams(frequency_penalty=-3), "frequency_penalty must be in [-2, 2], got -3"),
    (SamplingParams(top_k=-1), "top_k must be 0 (off) or more, got -1"),
    (SamplingParams(penalty_last_n=-2), "penalty_last_n must be -1 (the whole context) or more, got -2"),
])
def test_out_of_range_values_are_named(params, message):
    with pytest.raises(UsageError) as info:
        params.check()
    assert info.value.message == message


# ---- penalties -----------------------------------------------------------------------------------


def _sampled(engine: Engine, params: SamplingParams) -> list[int]:
    """The token ids llama.cpp's sampler chain drew (recorded as they pass, the sampling itself untouched)."""
    drawn: list[int] = []
    sample = engine._sample

    def spy(sampler, ctx, i):
        drawn.append(sample(sampler, ctx, i))
        return drawn[-1]

    engine.reset()
    engine._sample = spy
    try:
        list(engine.generate("The sea is wide and the wind is strong.", params))
    finally:
        engine._sample = sample
    return drawn


@pytest.mark.parametrize("penalty", [{"repeat_penalty": 1000.0}, {"presence_penalty": 2.0, "frequency_penalty": 2.0}])
def test_penalties_keep_greedy_decoding_from_repeating_itself(qwen, penalty):
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, penalty_last_n=-1)
    plain = _sampled(qwen, greedy)
    assert len(plain) == 24 and len(set(plain)) < 12  # random weights: greedy decoding loops
    penalized = _sampled(qwen, SamplingParams(**{**greedy.__dict__, **penalty}))
    assert len(penalized) == len(set(penalized)) == 24  # once seen, a token falls below every unseen one
    prompt = set(qwen.tokenize("The sea is wide and the wind is strong."))
    assert not prompt & set(penalized) or "repeat_penalty" not in penalty  # the prompt counts as seen too


# ---- structured output ---------------------------------------------------------------------------


def test_schema_errors_are_one_line():
    with pytest.raises(UsageError, match=r"^the JSON schema cannot be turned into a grammar: Unrecognized schema"):
        grammar.schema_grammar({"type": "strange"})
    with pytest.raises(UsageError, match="grammar: Error resolving ref stdin#/definitions/missing"):
        grammar.schema_grammar({"$ref": "#/definitions/missing"})
    with pytest.raises(UsageError, match="a JSON schema must be an object, not list"):
        grammar.schema_grammar([1])
    with pytest.raises(UsageError, match="'response_format.type' must be text, json_object or json_schema"):
        grammar.response_format_grammar({"type": "xml"})
    with pytest.raises(UsageError, match="must be an object with a 'schema'"):
        grammar.response_format_grammar({"type": "json_schema", "json_schema": {"name": "x"}})
    assert grammar.response_format_grammar({"type": "text"}) is None
    assert grammar.response_format_grammar({"type": "json_object"}) == grammar.json_object_grammar()


def test_a_grammar_llama_cpp_cannot_parse_is_a_usage_error(qwen):
    with pytest.raises(UsageError, match="llama.cpp cannot parse the grammar"):
        list(qwen.generate("Hi", SamplingParams(grammar="root ::= (", max_tokens=4)))


def test_schema_constrained_decoding_on_a_random_model_validates(qwen):
    jsonschema = pytest.importorskip("jsonschema")
    rule = grammar.schema_grammar(ASCII_PERSON)
    for seed in range(5):
        qwen.reset()
        chunks = list(qwen.generate("Describe a person.", SamplingParams(temperature=1.0, seed=seed, max_tokens=300,
                                                                         grammar=rule)))
        assert chunks[-1].finish_reason == "stop"  # the grammar ended the answer, not max_tokens
        jsonschema.validate(json.loads("".join(c.text for c in chunks)), ASCII_PERSON)


def test_generate_json_schema_validates_for_20_seeds_on_the_demo_model(tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    schema = tmp_path / "person.schema.json"
    schema.write_text(json.dumps(PERSON))
    runner = CliRunner()
    texts = set()
    for seed in range(20):
        r = runner.invoke(app, ["generate", str(demo_model_path()), "-p", "Describe a person as JSON.",
                                "--json-schema", str(schema), "--temp", "0.9", "--seed", str(seed), "-n", "300",
                                "--threads", "1", "--json"])
        assert r.exit_code == 0, r.output
        record = json.loads(r.stdout)
        assert record["finish_reason"] == "stop"
        jsonschema.validate(json.loads(record["text"]), PERSON)
        texts.add(record["text"])
    assert len(texts) > 10  # sampled, not one answer forced 20 times


def test_generate_with_a_bad_schema_is_one_error_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"type": "object", "properties": {"x": {"type": "strange"}}}')
    r = subprocess.run([sys.executable, "-m", "moelocal", "generate", "-p", "Hi", "--json-schema", str(bad)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert lines[0].startswith("Error: the JSON schema cannot be turned into a grammar: Unrecognized schema")
    assert len([line for line in lines if line.startswith("Error")]) == 1 and "Traceback" not in r.stderr


def test_batch_records_may_each_ask_for_a_response_format(tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    lines = [
        {"id": "schema", "messages": [{"role": "user", "content": "A person as JSON."}], "response_format": fmt},
        {"id": "object", "messages": [{"role": "user", "content": "A person as JSON."}],  # llama-server's form
         "response_format": {"type": "json_object", "schema": ASCII_PERSON}},
        {"id": "text", "prompt": "Once upon a time", "max_tokens": 8},
        {"id": "bad", "prompt": "x", "response_format": {"type": "json_schema", "json_schema": {"schema": 3}}},
    ]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "out.jsonl"
    r = CliRunner().invoke(app, ["batch", str(demo_model_path()), str(src), "-o", str(out), "--temp", "0.9",
                                 "--seed", "4", "-n", "300", "--threads", "1"])
    assert r.exit_code == 0, r.output
    records = {rec["id"]: rec for rec in map(json.loads, out.read_text().splitlines())}
    assert records["bad"]["error"] == "line 4: a JSON schema must be an object, not int"
    jsonschema.validate(json.loads(records["schema"]["content"]), PERSON)
    jsonschema.validate(json.loads(records["object"]["content"]), ASCII_PERSON)
    assert records["schema"]["finish_reason"] == records["object"]["finish_reason"] == "stop"
    with pytest.raises(json.JSONDecodeError):  # no grammar on this one: the demo model writes prose
        json.loads(records["text"]["content"])


def test_sampling_flags_out_of_range_are_one_error_line():
    r = subprocess.run([sys.executable, "-m", "moelocal", "generate", "-p", "Hi", "--repeat-penalty", "0"],
                       capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout) != (0, "") and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[0] == "Error: repeat_penalty must be above 0 (1 is off), got 0.0"


def test_a_grammar_of_tool_calls_for_hermes_style_models_only():
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "x": {"type": "integer"}}, "required": ["x"]}}}]
    rules = grammar.tool_call_grammar("hermes", tools).splitlines()
    assert rules[:2] == ['root ::= one ("\\n" one)*', 'one ::= "<tool_call>\\n" call "\\n</tool_call>"']
    assert 'call ::= "{" space name-kv "," space arguments-kv "}" space' in rules  # name first, as Qwen3 writes
    assert grammar.tool_call_grammar("harmony", tools) is None and grammar.tool_call_grammar(None, tools) is None
