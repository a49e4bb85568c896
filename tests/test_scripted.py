"""Scripted models (moelocal.scripted): loaded through moelocal's Engine, they say their scripts
token for token, picking the script from the prompt as a real model would (tools offered, a tool's
result), with the real Qwen3 and gpt-oss tokenizers and templates."""

from __future__ import annotations

import ctypes

import pytest

from moelocal import scripted
from moelocal.engine import Engine, SamplingParams
from moelocal.gguf_model import read_summary
from moelocal.plan import Placement, Plan, Prediction, RunOptions

GREEDY = SamplingParams(temperature=0, max_tokens=100)
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
ASK = {"role": "user", "content": "What is the weather in Paris?"}
CALL = {"role": "assistant", "content": "", "tool_calls": [
    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}
RESULT = {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "sunny", "celsius": 18}'}
CONVERSATIONS = {  # script -> (messages, tools)
    "plain": ([{"role": "user", "content": "Hi there!"}], None),
    "call": ([ASK], TOOLS),
    "answer": ([ASK, CALL, RESULT], TOOLS),
}


def cpu_plan() -> Plan:
    return Plan(placement=Placement(), options=RunOptions(n_ctx=2048, n_threads=1), memory={}, budget={},
                predicted=Prediction(0, 0), fits=True)


def said(engine: Engine, prompt, params: SamplingParams = GREEDY) -> tuple[list[int], str]:
    """The token ids greedy decoding drew, and their text with special tokens written out."""
    import llama_cpp

    drawn: list[int] = []
    sample = engine._sample

    def spy(sampler, ctx, i):
        drawn.append(sample(sampler, ctx, i))
        return drawn[-1]

    engine.reset()
    engine._sample = spy
    try:
        chunks = list(engine.generate(prompt, params))
    finally:
        engine._sample = sample
    assert chunks[-1].finish_reason == "stop"
    buf = ctypes.create_string_buffer(256)
    vocab = llama_cpp.llama_model_get_vocab(engine.model)
    pieces = []
    for t in drawn[:-1]:
        n = llama_cpp.llama_token_to_piece(vocab, t, buf, 256, 0, True)
        pieces.append(buf.raw[:n])
    return drawn, b"".join(pieces).decode()


@pytest.fixture(scope="module", params=sorted(scripted.FAMILIES))
def family(request, scripted_models):
    with Engine.load(scripted_models[request.param], cpu_plan()) as engine:
        yield request.param, engine


@pytest.mark.parametrize("script", ["plain", "call", "answer"])
def test_greedy_decoding_says_the_script_the_conversation_calls_for(family, script, llama_assets):
    name, engine = family
    messages, tools = CONVERSATIONS[script]
    drawn, text = said(engine, engine.chat_tokens(messages, tools=tools))
    assert drawn == scripted.script_ids(name, llama_assets / "models")[script]
    assert text == scripted.script_text(name, script)
    # it ends on the family's end-of-generation token (gpt-oss: <|call|> after a tool call, else <|return|>)
    assert engine.detokenize(drawn[-1:]) == scripted.FAMILIES[name].scripts()[script].end


def test_the_scripts_read_like_the_real_models(family):
    name, _ = family
    if name == "qwen3":
        assert scripted.script_text(name, "call").endswith(
            '</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>')
    else:
        assert scripted.script_text(name, "call").endswith(
            '<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>'
            '{"city":"Paris"}')


def test_any_prompt_starts_the_plain_script(family, llama_assets):
    name, engine = family
    _, text = said(engine, "Once upon a time there was a model that")
    assert text == scripted.script_text(name, "plain")


def test_a_scripted_model_is_a_small_moe_with_the_real_tokenizer(scripted_models):
    s = read_summary(scripted_models["qwen3"])
    assert (s.architecture, s.is_moe, s.n_layer) == ("glm4moe", True, 2)
    with Engine.load(scripted_models["qwen3"], cpu_plan()) as e:
        # Qwen3's added tokens at their real ids; its chat template is the real one
        assert e.tokenize("<think></think><tool_call>", add_special=False) == [151667, 151668, 151657]
        assert "<tool_call>" in e.chat_template and "enable_thinking" in e.chat_template
    with Engine.load(scripted_models["gpt-oss"], cpu_plan()) as e:
        assert [e._token_text(t) for t in e.tokenize("<|start|>assistant<|channel|>final", add_special=False)] == [
            "<|start|>", "assistant", "<|channel|>", "final"]
        assert "reasoning_effort" in e.chat_template
