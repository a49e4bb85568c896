"""Reasoning, answer and tool calls taken apart from what real models write, after real template renders.

Each case renders the model family's own template (from the vendored llama.cpp) to get the prompt the
model continues, then feeds a completion in the exact form that family emits: whole, one character at
a time and in random chunks. All three must give the same message, and the deltas must add up to it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from moelocal.formats import CHATML_TEMPLATE, ChatFormat, Delta, Message, ToolCall, detect_format, render_chat

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        "required": ["city"]}}},
    {"type": "function", "function": {"name": "get_time", "description": "The time in a zone", "parameters": {
        "type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]}}},
]
ASK = [{"role": "user", "content": "What is the weather in Paris, and the time in Tokyo?"}]
PARIS = '{"city": "Paris"}'
TOKYO = '{"zone": "Asia/Tokyo"}'


def template(llama_assets: Path, name: str) -> str:
    return (llama_assets / "models" / "templates" / name).read_text(encoding="utf-8")


def feed(fmt: ChatFormat, prompt: str, text: str, how: str | int, tools=TOOLS) -> tuple[Message, list[Delta]]:
    """Parse ``text`` fed whole ("whole"), per character ("chars") or in random chunks (an int seed)."""
    p = fmt.parser(prompt, tools)
    deltas: list[Delta] = []
    if how == "whole":
        pieces = [text]
    elif how == "chars":
        pieces = list(text)
    else:
        rng = random.Random(how)
        pieces, i = [], 0
        while i < len(text):
            n = rng.randint(1, 9)
            pieces.append(text[i:i + n])
            i += n
    for piece in pieces:
        deltas += p.feed(piece)
    deltas += p.flush()
    return p.finish(), deltas


def parse(fmt: ChatFormat, prompt: str, text: str, tools=TOOLS) -> Message:
    """The message, after checking every way of feeding it gives the same one, deltas included."""
    whole, deltas = feed(fmt, prompt, text, "whole", tools)
    for how in ("chars", 1, 2, 3):
        again, more = feed(fmt, prompt, text, how, tools)
        assert again == whole, how
        assert [d.call for d in more if d.call] == [d.call for d in deltas if d.call]
        assert "".join(d.text for d in more if d.kind == "content") == whole.content
        assert "".join(d.text for d in more if d.kind == "reasoning") == whole.reasoning
    assert tuple(d.call for d in deltas if d.kind == "tool_call") == whole.tool_calls
    assert [d.index for d in deltas if d.kind == "tool_call"] == list(range(len(whole.tool_calls)))
    return whole


def calls(msg: Message) -> list[tuple[str, dict]]:
    return [(c.name, json.loads(c.arguments)) for c in msg.tool_calls]


# ---- which format -----------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "reasoning", "tools", "toggle", "effort"), [
    ("Qwen-Qwen3-0.6B.jinja", "think", "hermes", True, False),
    ("Qwen3.5-4B.jinja", "think", "qwen3-coder", True, False),
    ("Qwen3-Coder.jinja", None, "qwen3-coder", False, False),
    ("deepseek-ai-DeepSeek-V3.1.jinja", "think", "deepseek", True, False),
    ("GLM-4.6.jinja", "think", "glm", True, False),
    ("Kimi-K2-Thinking.jinja", "think", "kimi", False, False),
    ("moonshotai-Kimi-K2.jinja", None, "kimi", False, False),
    ("MiniMax-M2.jinja", "think", "minimax", False, False),
    ("openai-gpt-oss-120b.jinja", "harmony", "harmony", False, True),
    ("meta-llama-Llama-3.1-8B-Instruct.jinja", None, None, False, False),
])
def test_the_format_comes_from_the_template(llama_assets, name, reasoning, tools, toggle, effort):
    fmt = detect_format(template(llama_assets, name), ())
    assert (fmt.reasoning, fmt.tools, fmt.thinking_toggle, fmt.effort) == (reasoning, tools, toggle, effort)


def test_without_a_template_of_its_own_the_vocabulary_decides():
    assert detect_format(CHATML_TEMPLATE, ["<|im_start|>", "<|im_end|>"]) == ChatFormat()
    qwen3 = detect_format(CHATML_TEMPLATE, ["<|im_start|>", "<think>", "</think>", "<tool_call>", "</tool_call>"])
    assert (qwen3.reasoning, qwen3.tools) == ("think", "hermes")
    assert detect_format("", ["<|start|>", "<|channel|>", "<|message|>", "<|end|>"]).reasoning == "harmony"
    assert detect_format(CHATML_TEMPLATE, ["<|start|>", "<|channel|>", "<|message|>"]).tools == "harmony"
    # a real template that never thinks is believed over a vocabulary that has the tags (Qwen3-Coder)
    assert detect_format("{{ messages[0].content }}", ["<think>", "</think>"]).reasoning is None


# ---- <think> families --------------------------------------------------------------------------


def test_qwen3_thinks_then_answers(llama_assets):
    t = template(llama_assets, "Qwen-Qwen3-0.6B.jinja")
    fmt = detect_format(t)
    prompt, _ = render_chat(fmt, t, [{"role": "user", "content": "Hi"}])
    assert prompt.endswith("<|im_start|>assistant\n") and not fmt.starts_in_reasoning(prompt)
    msg = parse(fmt, prompt, "<think>\nThe user greets me. I greet back.\n</think>\n\nHello! How can I help?")
    assert msg == Message("Hello! How can I help?", "The user greets me. I greet back.", ())


def test_qwen3_calls_two_tools_in_one_answer(llama_assets):
    t = template(llama_assets, "Qwen-Qwen3-0.6B.jinja")
    fmt = detect_format(t)
    prompt, _ = render_chat(fmt, t, ASK, tools=TOOLS)
    out = ("<think>\nTwo tools are needed.\n</think>\n\nLet me look both up.\n<tool_call>\n"
           '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n<tool_call>\n'
           '{"name": "get_time", "arguments": {"zone": "Asia/Tokyo"}}\n</tool_call>')
    msg = parse(fmt, prompt, out)
    assert (msg.reasoning, msg.content) == ("Two tools are needed.", "Let me look both up.")
    assert calls(msg) == [("get_weather", {"city": "Paris"}), ("get_time", {"zone": "Asia/Tokyo"})]
    assert msg.tool_calls[0].id != msg.tool_calls[1].id and msg.tool_calls[0].id.startswith("call_")
    # the answer goes back into the conversation with the results, as the template expects it
    history = ASK + [msg.to_openai()] + [
        {"role": "tool", "tool_call_id": msg.tool_calls[0].id, "content": "18 C"},
        {"role": "tool", "tool_call_id": msg.tool_calls[1].id, "content": "21:04"}]
    again, notes = render_chat(fmt, t, history, tools=TOOLS)
    assert notes == ()
    assert again.startswith(prompt[: prompt.rindex("<|im_start|>assistant")])
    assert ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in again)
    assert "<tool_response>\n18 C\n</tool_response>\n<tool_response>\n21:04\n</tool_response>" in again


def test_qwen35_opens_the_reasoning_in_the_prompt_and_calls_in_xml(llama_assets):
    t = template(llama_assets, "Qwen3.5-4B.jinja")
    fmt = detect_format(t)
    prompt, _ = render_chat(fmt, t, ASK, tools=TOOLS)
    assert prompt.endswith("<think>\n") and fmt.starts_in_reasoning(prompt)
    out = ("I need the weather.\n</think>\n\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n"
           "</parameter>\n<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>")
    msg = parse(fmt, prompt, out)
    assert (msg.reasoning, msg.content) == ("I need the weather.", "")
    assert calls(msg) == [("get_weather", {"city": "Paris", "days": 3})]  # typed by the tool's schema
    off, _ = render_chat(fmt, t, ASK, tools=TOOLS, enable_thinking=False)
    assert not fmt.starts_in_reasoning(off)
    assert parse(fmt, off, "Sunny, I think.") == Message("Sunny, I think.")


def test_deepseek_v31_reasoning_and_its_tool_call_section(llama_assets):
    t = template(llama_assets, "deepseek-ai-DeepSeek-V3.1.jinja")
    fmt = detect_format(t)
    prompt, _ = render_chat(fmt, t, ASK, tools=TOOLS, thinking=True)
    assert prompt.endswith("<｜Assistant｜><think>") and fmt.starts_in_reasoning(prompt)
    out = ("Both are needed.</think>Looking up.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>"
           f"{PARIS}<｜tool▁call▁end｜><｜tool▁call▁begin｜>get_time<｜tool▁sep｜>{TOKYO}<｜tool▁call▁end｜>"
           "<｜tool▁calls▁end｜>")
    msg = parse(fmt, prompt, out)
    assert (msg.reasoning, msg.content) == ("Both are needed.", "Looking up.")
    assert calls(msg) == [("get_weather", {"city": "Paris"}), ("get_time", {"zone": "Asia/Tokyo"})]
    plain, _ = render_chat(fmt, t, ASK)  # thinking off: the prompt closes the block itself
    assert plain.endswith("<think></think>") and not fmt.starts_in_reasoning(plain)


def test_glm46_arg_key_arg_value(llama_assets):
    t = template(llama_assets, "GLM-4.6.jinja")
    fmt = detect_format(t)
    prompt, _ = render_chat(fmt, t, ASK, tools=TOOLS)
    out = ("<think>Weather first.</think>\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris"
           "</arg_value>\n<arg_key>days</arg_key>\n<arg_value>2</arg_value>\n</tool_call>\n<tool_call>get_time\n"
           "<arg_key>zone</arg_key>\n<arg_value>Asia/Tokyo</arg_value>\n</tool_call>")
    msg = parse(fmt, prompt, out)
    assert msg.reasoning == "Weather first." and msg.content == ""
    assert calls(msg) == [("get_weather", {"city": "Paris", "days": 2}), ("get_time", {"zone": "Asia/Tokyo"})]


def test_kimi_k2_keeps_the_ids_it_wrote(llama_assets):
    t = template(llama_assets, "Kimi-K2-Thinking.jinja")
    fmt = detect_format(t)
    prompt, _ = render_chat(fmt, t, ASK, tools=TOOLS)
    out = ("<think>Two lookups.</think>On it.<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
           f"<|tool_call_argument_begin|>{PARIS}<|tool_call_end|><|tool_call_begin|>functions.get_time:1"
           f"<|tool_call_argument_begin|>{TOKYO}<|tool_call_end|><|tool_calls_section_end|>")
    msg = parse(fmt, prompt, out)
    assert (msg.reasoning, msg.content) == ("Two lookups.", "On it.")
    assert msg.tool_calls == (ToolCall("functions.get_weather:0", "get_weather", PARIS),
                              ToolCall("functions.get_time:1", "get_time", TOKYO))


def test_minimax_m2_invoke_xml(llama_assets):
    t = template(llama_assets, "MiniMax-M2.jinja")
    fmt = detect_format(t)
    prompt, _ = render_chat(fmt, t, ASK, tools=TOOLS)
    assert fmt.starts_in_reasoning(prompt)
    out = ('Weather, then time.\n</think>\n\n<minimax:tool_call>\n<invoke name="get_weather">\n<parameter name="city">'
           'Paris</parameter>\n</invoke>\n<invoke name="get_time">\n<parameter name="zone">Asia/Tokyo</parameter>\n'
           "</invoke>\n</minimax:tool_call>")
    msg = parse(fmt, prompt, out)
    assert msg.reasoning == "Weather, then time."
    assert calls(msg) == [("get_weather", {"city": "Paris"}), ("get_time", {"zone": "Asia/Tokyo"})]


def test_qwen3_coder_with_and_without_the_tool_call_tag(llama_assets):
    t = template(llama_assets, "Qwen3-Coder.jinja")
    fmt = detect_format(t)
    prompt, _ = render_chat(fmt, t, ASK, tools=TOOLS)
    tagged = "<tool_call>\n<function=get_time>\n<parameter=zone>\nAsia/Tokyo\n</parameter>\n</function>\n</tool_call>"
    bare = "<function=get_time>\n<parameter=zone>\nAsia/Tokyo\n</parameter>\n</function>"
    for out in (tagged, bare):
        assert calls(parse(fmt, prompt, out)) == [("get_time", {"zone": "Asia/Tokyo"})]


# ---- harmony ------------------------------------------------------------------------------------


def test_gpt_oss_analysis_then_final(llama_assets):
    t = template(llama_assets, "openai-gpt-oss-120b.jinja")
    fmt = detect_format(t)
    prompt, _ = render_chat(fmt, t, [{"role": "user", "content": "Hi"}], reasoning_effort="low")
    assert prompt.endswith("<|start|>assistant") and "Reasoning: low" in prompt
    out = ("<|channel|>analysis<|message|>The user asks for a greeting. Simple.<|end|><|start|>assistant"
           "<|channel|>final<|message|>Hello! How can I help?")
    assert parse(fmt, prompt, out) == Message("Hello! How can I help?", "The user asks for a greeting. Simple.")


def test_gpt_oss_tool_call_in_either_header_order(llama_assets):
    t = template(llama_assets, "openai-gpt-oss-120b.jinja")
    fmt = detect_format(t)
    prompt, _ = render_chat(fmt, t, ASK, tools=TOOLS)
    for header in ("<|channel|>commentary to=functions.get_weather <|constrain|>json",
                   " to=functions.get_weather<|channel|>commentary json"):
        out = f"<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant{header}<|message|>{PARIS}"
        msg = parse(fmt, prompt, out)
        assert (msg.reasoning, msg.content) == ("Need the weather.", "")
        assert calls(msg) == [("get_weather", {"city": "Paris"})]
    # a preamble on the commentary channel is for the user
    out = ("<|channel|>commentary<|message|>Checking.<|end|><|start|>assistant<|channel|>commentary "
           f"to=functions.get_time <|constrain|>json<|message|>{TOKYO}<|call|>")
    msg = parse(fmt, prompt, out)
    assert msg.content == "Checking." and calls(msg) == [("get_time", {"zone": "Asia/Tokyo"})]
    # and the round trip: the call and its result render back through the template
    history = ASK + [msg.to_openai(), {"role": "tool", "tool_call_id": msg.tool_calls[0].id, "content": "21:04"}]
    again, _ = render_chat(fmt, t, history, tools=TOOLS)
    assert ('<|start|>assistant to=functions.get_time<|channel|>commentary json<|message|>'
            '{"zone": "Asia/Tokyo"}<|call|>') in again
    assert '<|start|>functions.get_time to=assistant<|channel|>commentary<|message|>"21:04"<|end|>' in again


# ---- what is not recognised ---------------------------------------------------------------------


def test_an_unknown_format_is_content_untouched(llama_assets):
    fmt = detect_format(template(llama_assets, "meta-llama-Llama-3.1-8B-Instruct.jinja"))
    out = '  <think>not ours</think>\n<tool_call>{"name": "x"}</tool_call> <|eom_id|>  '
    assert parse(fmt, "", out) == Message(out)


def test_malformed_calls_come_back_as_content():
    fmt = ChatFormat("think", "hermes")
    out = "<think>hm</think>Here: <tool_call>\n{not json}\n</tool_call> and <tool_call>{\"name\": 3}</tool_call>"
    msg = parse(fmt, "", out)
    assert msg == Message('Here: <tool_call>\n{not json}\n</tool_call> and <tool_call>{"name": 3}</tool_call>', "hm")


def test_an_answer_cut_short_keeps_what_it_has():
    fmt = ChatFormat("think", "hermes")
    assert parse(fmt, "", "<think>\nStill thinking about") == Message("", "Still thinking about")
    # a call cut off by max_tokens is not a call
    cut = parse(fmt, "", 'Sure.\n<tool_call>\n{"name": "get_weather", "argu')
    assert cut.tool_calls == () and cut.content.startswith("Sure.\n<tool_call>")
    # a partial marker at the very end is text after all
    assert parse(fmt, "", "<think>a</think>b <tool_ca") == Message("b <tool_ca", "a")


@pytest.mark.parametrize("name", ["Qwen-Qwen3-0.6B.jinja", "Qwen3.5-4B.jinja", "deepseek-ai-DeepSeek-V3.1.jinja",
                                  "GLM-4.6.jinja", "Kimi-K2-Thinking.jinja", "MiniMax-M2.jinja",
                                  "openai-gpt-oss-120b.jinja"])
def test_earlier_turns_render_the_same_every_turn(llama_assets, name):
    """What chat keeps of an answer (content, reasoning apart) renders the same way in every later prompt,
    so the KV cache holds a valid prefix: the templates that drop old reasoning drop it every time."""
    t = template(llama_assets, name)
    fmt = detect_format(t)
    first = Message("Hello!", "The user greets me.").to_openai()
    second = Message("Fine, thanks.", "Asked how I am.").to_openai()
    turn2 = [{"role": "user", "content": "Hi"}, first, {"role": "user", "content": "How are you?"}]
    turn3 = turn2 + [second, {"role": "user", "content": "Good."}]
    prompt2, _ = render_chat(fmt, t, turn2)
    prompt3, _ = render_chat(fmt, t, turn3)
    gen_prompt = render_chat(fmt, t, turn2, add_generation_prompt=False)[0]
    assert prompt3.startswith(gen_prompt), (gen_prompt, prompt3)
    assert "The user greets me." not in prompt3  # old reasoning is dropped by these templates
    assert prompt2.startswith(gen_prompt)


def test_mistral_tool_calls_old_and_new(llama_assets):
    nemo = detect_format(template(llama_assets, "mistralai-Mistral-Nemo-Instruct-2407.jinja"))
    small = detect_format(template(llama_assets, "Mistral-Small-3.2-24B-Instruct-2506.jinja"))
    ministral = detect_format(template(llama_assets, "mistralai-Ministral-3-14B-Reasoning-2512.jinja"))
    assert (nemo.tools, small.tools, ministral.tools, ministral.reasoning) == ("mistral",) * 3 + ("think",)
    old = f'[TOOL_CALLS][{{"name": "get_weather", "arguments": {PARIS}}}, {{"name": "get_time", "arguments": {TOKYO}}}]'
    assert calls(parse(nemo, "", old)) == [("get_weather", {"city": "Paris"}), ("get_time", {"zone": "Asia/Tokyo"})]
    new = f"Checking.[TOOL_CALLS]get_weather[ARGS]{PARIS}[TOOL_CALLS]get_time[ARGS]{TOKYO}"
    msg = parse(small, "", new)
    assert msg.content == "Checking."
    assert calls(msg) == [("get_weather", {"city": "Paris"}), ("get_time", {"zone": "Asia/Tokyo"})]
    thought = parse(ministral, "", f"[THINK]Weather.[/THINK][TOOL_CALLS]get_weather[ARGS]{PARIS}")
    assert thought.reasoning == "Weather." and calls(thought) == [("get_weather", {"city": "Paris"})]


def test_qwen3_coder_drops_the_closer_of_a_call_that_skipped_its_opener(llama_assets):
    fmt = detect_format(template(llama_assets, "Qwen3-Coder.jinja"))
    out = ("Let me call it.\n<function=get_time>\n<parameter=zone>\nAsia/Tokyo\n</parameter>\n</function>\n"
           "</tool_call>\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
           "<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>")
    msg = parse(fmt, "", out)
    assert msg.content == "Let me call it."
    assert calls(msg) == [("get_time", {"zone": "Asia/Tokyo"}), ("get_weather", {"city": "Paris", "days": 2})]
    code = ("<tool_call>\n<function=run>\n<parameter=code>\ndef f():\n    return \"格\"\n\nf()\n</parameter>\n"
            "</function>")
    assert calls(parse(fmt, "", code, tools=None)) == [("run", {"code": 'def f():\n    return "格"\n\nf()'})]


def test_gpt_oss_calls_to_tools_nobody_offered_are_left_out():
    fmt = ChatFormat("harmony", "harmony")
    out = ("<|channel|>analysis<|message|>I will run python.<|end|><|start|>assistant to=container.exec"
           "<|channel|>commentary<|message|>python3 -c 'print(1)'")
    assert parse(fmt, "<|start|>assistant", out) == Message("", "I will run python.")
    final_json = ("<|channel|>analysis<|message|>JSON it is.<|end|><|start|>assistant<|channel|>final "
                  '<|constrain|>json<|message|>{"amount": 1}')
    assert parse(fmt, "<|start|>assistant", final_json) == Message('{"amount": 1}', "JSON it is.")
