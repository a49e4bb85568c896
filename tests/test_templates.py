"""Every chat template that ships with the vendored llama.cpp renders, through moelocal.formats, a plain
conversation and one with tools, a tool call and its result; and the adaptations say what they did."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from moelocal.errors import EngineError
from moelocal.formats import detect_format, probe, render_chat, render_raw, render_template
from moelocal.formats.render import NOTE_MERGED, NOTE_SYSTEM, NOTE_TOOL_ROLE

# The listing is read at collection time (parametrize needs the names); the tests read the files
# through the llama_assets fixture, which fails with the fix when the assets are missing.
_DIR = Path(sys.prefix) / "share" / "llama.cpp" / "models" / "templates"
NAMES = sorted(p.name for p in _DIR.glob("*.jinja")) or ["(no templates installed)"]

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "the city"}},
                   "required": ["city"]}}}]
PLAIN = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hello there"},
    {"role": "assistant", "content": "Hi! How can I help?"},
    {"role": "user", "content": "Tell me a joke"},
]
WITH_TOOLS = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees and sunny"},
]


def _template(llama_assets: Path, name: str) -> str:
    return (llama_assets / "models" / "templates" / name).read_text(encoding="utf-8")


def test_the_templates_are_there(llama_assets):
    assert len(list((llama_assets / "models" / "templates").glob("*.jinja"))) >= 70


@pytest.mark.parametrize("name", NAMES)
def test_a_plain_conversation_renders(llama_assets, name):
    template = _template(llama_assets, name)
    text, notes = render_chat(detect_format(template), template, PLAIN)
    # every turn is there, in order; the system message where the template puts it (Mistral: in the last
    # user turn) or, where it has no system role, at the start of the first user turn
    assert "You are terse." in text
    where = [text.find(s) for s in ("Hello there", "Hi! How can I help?", "Tell me a joke")]
    assert -1 not in where, text
    assert where == sorted(where), text
    assert notes in ((), (NOTE_SYSTEM,))
    if notes:
        assert "You are terse.\n\nHello there" in text


@pytest.mark.parametrize("name", NAMES)
def test_a_conversation_with_a_tool_call_and_its_result_renders(llama_assets, name):
    template = _template(llama_assets, name)
    text, notes = render_chat(detect_format(template), template, WITH_TOOLS, tools=TOOLS)
    asked, result = text.find("Weather in Paris?"), text.find("18 degrees and sunny")
    assert 0 <= asked < result, text
    call = text[asked:result]
    assert "get_weather" in call and "Paris" in call, text  # the call itself, between question and result
    assert "The weather in a city" in text  # the tool's description reached the model one way or another
    assert "{'city'" not in call and '\\"city\\"' not in call  # arguments neither a Python repr nor double-encoded
    assert "None" not in call


def test_gemma2_takes_the_system_message_in_the_first_user_turn(llama_assets):
    template = _template(llama_assets, "google-gemma-2-2b-it.jinja")
    with pytest.raises(EngineError, match="System role not supported"):
        render_template(template, PLAIN)  # as the model's authors wrote it
    text, notes = render_chat(detect_format(template), template, PLAIN)
    assert text == ("<start_of_turn>user\nYou are terse.\n\nHello there<end_of_turn>\n<start_of_turn>model\n"
                    "Hi! How can I help?<end_of_turn>\n<start_of_turn>user\nTell me a joke<end_of_turn>\n"
                    "<start_of_turn>model\n")  # (bos_token is "" here: the engine passes the vocabulary's)
    assert notes == (NOTE_SYSTEM,)
    text, notes = render_chat(detect_format(template), template, WITH_TOOLS, tools=TOOLS)
    assert NOTE_TOOL_ROLE in notes
    assert '{"tool_response": {"tool": "get_weather", "content": "18 degrees and sunny", "id": "call_1"}}' in text


def test_qwen3_gets_arguments_as_an_object_and_the_hermes_tags(llama_assets):
    template = _template(llama_assets, "Qwen-Qwen3-0.6B.jinja")
    text, notes = render_chat(detect_format(template), template, WITH_TOOLS, tools=TOOLS)
    assert notes == ()
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert "<tool_response>\n18 degrees and sunny\n</tool_response>" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_a_template_that_wants_string_arguments_gets_the_json_text(llama_assets):
    template = _template(llama_assets, "meetkai-functionary-medium-v3.2.jinja")
    assert not probe(template).object_arguments
    text, _ = render_chat(detect_format(template), template, WITH_TOOLS, tools=TOOLS)
    assert '{"city": "Paris"}' in text


def test_mistral_gets_nine_character_ids_the_same_for_the_call_and_its_result(llama_assets):
    template = _template(llama_assets, "mistralai-Mistral-Nemo-Instruct-2407.jinja")
    with pytest.raises(EngineError, match="length 9"):
        render_template(template, WITH_TOOLS, tools=TOOLS)
    text, _ = render_chat(detect_format(template), template, WITH_TOOLS, tools=TOOLS)
    ids = re.findall(r'"id": "([^"]+)"', text)
    call_ids = re.findall(r'"call_id": "([^"]+)"', text)
    assert len(ids) == 1 and re.fullmatch(r"[A-Za-z0-9]{9}", ids[0]) and call_ids == ids, text


def test_kimi_gets_its_own_tool_call_ids(llama_assets):
    template = _template(llama_assets, "Kimi-K2-Thinking.jinja")
    text, notes = render_chat(detect_format(template), template, WITH_TOOLS, tools=TOOLS)
    assert notes == ()
    assert ('<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>'
            '{"city": "Paris"}<|tool_call_end|><|tool_calls_section_end|>') in text
    assert "## Return of functions.get_weather:0\n18 degrees and sunny" in text


def test_gpt_oss_gets_the_reasoning_as_thinking_and_the_effort(llama_assets):
    template = _template(llama_assets, "openai-gpt-oss-120b.jinja")
    fmt = detect_format(template)
    msgs = [{"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": "", "reasoning_content": "Need the tool.", "tool_calls": [
                {"id": "c1", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    text, _ = render_chat(fmt, template, msgs, tools=TOOLS, reasoning_effort="high")
    assert "Reasoning: high" in text
    assert ("<|start|>assistant<|channel|>analysis<|message|>Need the tool.<|end|><|start|>assistant "
            'to=functions.get_weather<|channel|>commentary json<|message|>{"city": "Paris"}<|call|>') in text
    assert '<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>"sunny"<|end|>' in text


def test_enable_thinking_reaches_the_template(llama_assets):
    template = _template(llama_assets, "Qwen-Qwen3-0.6B.jinja")
    fmt = detect_format(template)
    off, _ = render_chat(fmt, template, PLAIN[1:2], enable_thinking=False)
    on, _ = render_chat(fmt, template, PLAIN[1:2], enable_thinking=None)  # None: left undefined
    assert off == on + "<think>\n\n</think>\n\n"


def test_loop_controls_generation_blocks_and_tojson_options():
    assert render_raw("{% for x in [1, 2, 3] %}{% if x == 2 %}{% continue %}{% endif %}{{ x }}{% endfor %}", []) == "13"
    assert render_raw("{% for x in [1, 2, 3] %}{% if x == 2 %}{% break %}{% endif %}{{ x }}{% endfor %}", []) == "1"
    assert render_raw("a{% generation %}b{{ 1 + 1 }}{% endgeneration %}c", []) == "ab2c"
    value = {"b": "é", "a": [1, 2]}
    assert render_raw("{{ v | tojson }}", [], v=value) == '{"b": "é", "a": [1, 2]}'  # not HTML-escaped
    assert render_raw("{{ v | tojson(indent=2, sort_keys=True) }}", [], v=value) == json.dumps(
        value, indent=2, sort_keys=True, ensure_ascii=False)
    assert render_raw("{{ v | tojson(separators=(',', ':'), ensure_ascii=True) }}", [], v=value) == \
        '{"b":"\\u00e9","a":[1,2]}'
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", render_raw("{{ strftime_now('%Y-%m-%d') }}", []))


def test_templates_may_change_their_own_lists_never_the_callers():
    own = "{% set ns = namespace(ids=[]) %}{% set _ = ns.ids.append(1) %}{% set _ = ns.ids.append(2) %}{{ ns.ids }}"
    assert render_raw(own, []) == render_raw(own, []) == "[1, 2]"
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(EngineError, match="unsafe"):
        render_template("{{ messages[0].update({'role': 'x'}) }}", msgs)
    assert msgs == [{"role": "user", "content": "hi"}]


def test_consecutive_turns_are_joined_where_roles_must_alternate(llama_assets):
    template = _template(llama_assets, "google-gemma-2-2b-it.jinja")
    assert probe(template).alternating
    text, notes = render_chat(detect_format(template), template, [
        {"role": "user", "content": "One"}, {"role": "user", "content": "Two"}])
    assert text == "<start_of_turn>user\nOne\n\nTwo<end_of_turn>\n<start_of_turn>model\n"
    assert notes == (NOTE_MERGED,)


def test_content_parts_become_text_where_the_template_reads_a_string(llama_assets):
    template = _template(llama_assets, "Qwen-Qwen3-0.6B.jinja")
    assert not probe(template).typed_content
    parts = [{"type": "text", "text": "Hello "}, {"type": "image_url", "image_url": {"url": "x"}},
             {"type": "text", "text": "there"}]
    text, _ = render_chat(detect_format(template), template, [{"role": "user", "content": parts}])
    assert text == "<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n"
