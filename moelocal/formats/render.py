"""Render a conversation through a model's template, adapting the messages to what it accepts.

Templates differ in what they take: some reject a system message, have no tool role, want tool-call
arguments as an object or as a JSON string, insist on alternating roles or on a form of tool-call id.
As llama.cpp does, each template is probed once with small conversations (marker strings show what
it rendered), and the messages are adapted ("polyfills"); each adaptation comes back as a note, to be
shown once.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache
from typing import Any

from moelocal.errors import EngineError
from moelocal.formats.jinja import JsonText, TemplateFailed, render_raw

# ChatML: the fallback when a model carries no chat template of its own.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

NOTE_SYSTEM = "the chat template has no system role: the system message goes at the start of the first user message"
NOTE_TOOL_ROLE = "the chat template has no tool role: tool results go in user messages"
NOTE_TOOL_CALLS = "the chat template cannot show tool calls: earlier calls go in the assistant's text as JSON"
NOTE_TOOLS = "the chat template does not list tools: they are described in the system message"
NOTE_MERGED = "the chat template wants user and assistant turns to alternate: consecutive turns were joined"


@dataclass(frozen=True)
class Caps:
    """What a template accepts, found by rendering it (see probe)."""

    system_role: bool = True
    tool_role: bool = True
    tool_calls: bool = True
    tools: bool = True
    object_arguments: bool = False
    alternating: bool = False  # rejects two user messages in a row
    typed_content: bool = False  # reads content as a list of {"type": "text", ...} parts
    string_content: bool = True
    thinking_field: bool = False  # reads an assistant's reasoning as message.thinking (gpt-oss)
    id_form: str | None = None  # "kimi" (functions.NAME:IDX) or "nine" (9 alphanumerics, Mistral)
    functions_var: bool = False  # wants the tools as a JSON string in ``functions``, and ``datetime`` (firefunction)
    cohere_tools: bool = False  # wants tools as {name, description, parameter_definitions} (Command-R+)


_PROBE_TOOL = {"type": "function", "function": {"name": "probe_tool", "description": "PROBE_DESC",
                                                "parameters": {"type": "object", "properties": {"arg": {
                                                    "type": "string", "description": "an argument"}},
                                                    "required": ["arg"]}}}


def _tool_conversation(arguments: Any, call_id: str = "call00001") -> list[dict[str, Any]]:
    return [
        {"role": "user", "content": "USER_MARK"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": call_id, "type": "function", "function": {"name": "probe_tool", "arguments": arguments}}]},
        {"role": "tool", "content": "TOOL_MARK", "tool_call_id": call_id, "name": "probe_tool"},
        {"role": "assistant", "content": "ANSWER_MARK"},
        {"role": "user", "content": "AGAIN_MARK"},
    ]


def _try_plain(template: str, messages: list[dict[str, Any]], **variables: Any) -> str | None:
    try:
        return render_raw(template, messages, add_generation_prompt=True, bos_token="", eos_token="", **variables)
    except TemplateFailed:
        return None


@lru_cache(maxsize=128)
def probe(template: str) -> Caps:
    """What ``template`` accepts, by rendering small conversations with marker strings (once per template)."""
    caps: dict[str, Any] = {}
    caps["functions_var"] = _try_plain(template, [{"role": "user", "content": "U"}]) is None and \
        _try_plain(template, [{"role": "user", "content": "U"}], functions="[]", datetime="") is not None
    caps["cohere_tools"] = "parameter_definitions" in template
    if caps["functions_var"] or caps["cohere_tools"]:
        return _probe_rest(template, caps, _tool_variables(Caps(**caps), [_PROBE_TOOL]))
    return _probe_rest(template, caps, {"tools": [_PROBE_TOOL]})


def _probe_rest(template: str, caps: dict[str, Any], tool_vars: dict[str, Any]) -> Caps:
    extra = {k: v for k, v in tool_vars.items() if k in ("functions", "datetime")}  # needed even without tools

    def _try(template: str, messages: list[dict[str, Any]], **variables: Any) -> str | None:
        return _try_plain(template, messages, **{**extra, **variables})

    out = _try(template, [{"role": "system", "content": "SYSTEM_MARK"}, {"role": "user", "content": "USER_MARK"}])
    caps["system_role"] = out is not None and "SYSTEM_MARK" in out
    plain = _try(template, [{"role": "user", "content": "USER_MARK"}])
    caps["string_content"] = plain is not None and "USER_MARK" in plain
    typed = _try(template, [{"role": "user", "content": [{"type": "text", "text": "USER_MARK"}]}])
    caps["typed_content"] = typed is not None and "USER_MARK" in typed and "'type'" not in typed
    two = _try(template, [{"role": "user", "content": "A_MARK"}, {"role": "user", "content": "B_MARK"}])
    caps["alternating"] = two is None and _try(template, [
        {"role": "user", "content": "A_MARK"}, {"role": "assistant", "content": "B_MARK"},
        {"role": "user", "content": "C_MARK"}]) is not None
    caps["thinking_field"] = bool(re.search(r"message\.thinking|\[['\"]thinking['\"]\]|['\"]thinking['\"] in",
                                            template))
    if re.search(r"length\s*!=\s*9", template):
        caps["id_form"] = "nine"
    elif "<|tool_call_begin|>" in template:
        caps["id_form"] = "kimi"
    call_id = {"nine": "call00001", "kimi": "functions.probe_tool:0"}.get(caps.get("id_form") or "", "call00001")

    def good_object(text: str | None) -> bool:  # the argument shows, as JSON or XML, not a Python repr
        return text is not None and "ARG_MARK" in text and "{'arg'" not in text and '\\"arg' not in text

    obj = _try(template, _tool_conversation({"arg": "ARG_MARK"}, call_id), **tool_vars)
    string = None if good_object(obj) else _try(template, _tool_conversation(JsonText('{"arg": "ARG_MARK"}'), call_id),
                                                **tool_vars)
    caps["object_arguments"] = good_object(obj) or (obj is not None and string is None)
    best = obj if caps["object_arguments"] else string
    if best is None:  # neither renders: the calls (and results) have to be rewritten as plain turns
        caps.update(tool_calls=False, tool_role=False)
        flat = _try(template, [{"role": "user", "content": "USER_MARK"}], **tool_vars)
        caps["tools"] = flat is not None and "PROBE_DESC" in flat
    else:
        caps["tool_calls"] = "ARG_MARK" in best
        caps["tool_role"] = "TOOL_MARK" in best
        caps["tools"] = "PROBE_DESC" in best or "probe_tool" in best.split("USER_MARK")[0]
    return Caps(**caps)


def render_chat(fmt, template: str | None, messages: Sequence[Mapping[str, Any]],
                tools: Sequence[Mapping[str, Any]] | None = None, add_generation_prompt: bool = True,
                bos_token: str = "", eos_token: str = "", **kwargs: Any) -> tuple[str, tuple[str, ...]]:
    """The conversation (OpenAI-shaped messages: role, content, tool_calls, tool_call_id, name,
    reasoning_content) rendered by ``template``, and the notes of any adaptation it needed.

    ``kwargs`` go to the template (``enable_thinking``, ``reasoning_effort``, ``documents`` ...);
    None values are left out so that templates see them as undefined. An EngineError says why a
    template failed even so.
    """
    del fmt  # the format is for parsing; the template's own capabilities decide the rendering
    template = template or CHATML_TEMPLATE
    caps = probe(template)
    notes: list[str] = []
    msgs = adapt_messages(caps, messages, tools, notes)
    variables = {k: v for k, v in kwargs.items() if v is not None}
    variables.update(_tool_variables(caps, tools))
    try:
        text = render_raw(template, msgs, add_generation_prompt=add_generation_prompt, bos_token=bos_token,
                          eos_token=eos_token, **variables)
    except TemplateFailed as exc:
        raise EngineError(f"the model's chat template failed: {exc}",
                          "the GGUF's tokenizer.chat_template is broken; report it to the model's authors") from None
    return text, tuple(dict.fromkeys(notes))


def _tool_variables(caps: Caps, tools: Sequence[Mapping[str, Any]] | None) -> dict[str, Any]:
    """The template variables that carry the tools, in the shape the template reads."""
    out: dict[str, Any] = {}
    functions = [dict(t.get("function", t)) for t in tools or ()]
    if caps.functions_var:
        out["functions"] = json.dumps(functions, ensure_ascii=False, indent=2) if functions else ""
        out["datetime"] = datetime.now(timezone.utc).strftime("%b %d %Y %H:%M:%S GMT")
    if not tools:
        return out
    if caps.cohere_tools:
        out["tools"] = [{"name": f.get("name", ""), "description": f.get("description", ""),
                         "parameter_definitions": {
                             k: {"type": v.get("type", "string"), "description": v.get("description", ""),
                                 "required": k in (f.get("parameters") or {}).get("required", [])}
                             for k, v in ((f.get("parameters") or {}).get("properties") or {}).items()}}
                        for f in functions]
    else:
        out["tools"] = [dict(t) for t in tools]
    return out


def adapt_messages(caps: Caps, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None,
                   notes: list[str]) -> list[dict[str, Any]]:
    """The messages in the shape the template takes; ``notes`` gets one line per adaptation."""
    msgs = [_normalize(m, caps) for m in messages]
    ids = _id_map(caps, msgs)
    names: dict[str, str] = {}
    out: list[dict[str, Any]] = []
    for m in msgs:
        role = m.get("role")
        if role == "assistant" and m.get("tool_calls"):
            calls = []
            for c in m["tool_calls"]:
                fn = dict(c.get("function") or {})
                fn["arguments"] = _arguments_as(fn.get("arguments"), caps.object_arguments)
                old = str(c.get("id") or "")
                names[old] = fn.get("name", "")
                calls.append({**c, "id": ids.get(old, old), "type": c.get("type", "function"), "function": fn})
            if not caps.tool_calls:
                notes.append(NOTE_TOOL_CALLS)
                shown = [{"name": c["function"].get("name"), "arguments": _arguments_as(
                    c["function"].get("arguments"), True), "id": c["id"]} for c in calls]
                text = (m.get("content") or "") + ("\n" if m.get("content") else "")
                m = {k: v for k, v in m.items() if k != "tool_calls"}
                m["content"] = text + json.dumps({"tool_calls": shown}, ensure_ascii=False)
            else:
                m = {**m, "tool_calls": calls}
        elif role == "tool":
            old = str(m.get("tool_call_id") or "")
            if old:
                m = {**m, "tool_call_id": ids.get(old, old)}
            if not m.get("name") and old in names:
                m["name"] = names[old]
            if not caps.tool_role:
                notes.append(NOTE_TOOL_ROLE)
                result = {"tool_response": {"tool": m.get("name", ""), "content": m.get("content", "")}}
                if m.get("tool_call_id"):
                    result["tool_response"]["id"] = m["tool_call_id"]
                m = {"role": "user", "content": json.dumps(result, ensure_ascii=False)}
        out.append(m)
    if tools and not caps.tools:
        notes.append(NOTE_TOOLS)
        listed = json.dumps([dict(t) for t in tools], ensure_ascii=False, indent=2)
        described = ("You can call these tools; to call one, answer with a JSON object {\"tool_call\": {\"name\": "
                     "..., \"arguments\": {...}}}:\n" + listed)
        if out and out[0].get("role") == "system":
            out[0] = {**out[0], "content": f"{out[0].get('content', '')}\n\n{described}"}
        else:
            out.insert(0, {"role": "system", "content": described})
    if out and out[0].get("role") == "system" and not caps.system_role:
        notes.append(NOTE_SYSTEM)
        system = out.pop(0).get("content", "")
        if out and out[0].get("role") == "user":
            out[0] = {**out[0], "content": f"{system}\n\n{out[0].get('content', '')}"}
        else:
            out.insert(0, {"role": "user", "content": system})
    if caps.alternating:
        merged: list[dict[str, Any]] = []
        for m in out:
            if merged and m.get("role") == merged[-1].get("role") and m.get("role") in ("user", "assistant") \
                    and not m.get("tool_calls") and not merged[-1].get("tool_calls"):
                notes.append(NOTE_MERGED)
                merged[-1] = {**merged[-1], "content": f"{merged[-1].get('content', '')}\n\n{m.get('content', '')}"}
            else:
                merged.append(m)
        out = merged
    return out


def _normalize(m: Mapping[str, Any], caps: Caps) -> dict[str, Any]:
    out = dict(m)
    content = out.get("content")
    if content is None:
        out["content"] = ""
    elif isinstance(content, list) and not caps.typed_content:
        out["content"] = "".join(p.get("text", "") for p in content if isinstance(p, Mapping)
                                 and p.get("type", "text") == "text")
    elif isinstance(content, str) and caps.typed_content and not caps.string_content:
        out["content"] = [{"type": "text", "text": content}]
    if out.get("role") == "assistant":
        reasoning = out.get("reasoning_content") or out.get("thinking")
        if reasoning and caps.thinking_field and "thinking" not in out and not out.get("tool_calls"):
            out["thinking"] = reasoning
        elif reasoning and caps.thinking_field and out.get("tool_calls") and not out["content"]:
            out["thinking"] = reasoning  # gpt-oss keeps a tool call's analysis (content must be empty then)
        if not out.get("tool_calls"):
            out.pop("tool_calls", None)
    return out


def _arguments_as(arguments: Any, as_object: bool) -> Any:
    if as_object:
        if isinstance(arguments, str):
            try:
                value = json.loads(arguments) if arguments.strip() else {}
            except ValueError:
                return arguments  # not JSON: the template gets it as the model wrote it
            return value
        return arguments if arguments is not None else {}
    if isinstance(arguments, str):
        return JsonText(arguments)
    return JsonText(json.dumps(arguments if arguments is not None else {}, ensure_ascii=False))


def _id_map(caps: Caps, msgs: list[dict[str, Any]]) -> dict[str, str]:
    """Tool-call ids rewritten into the form the template insists on (the same for the call and its result)."""
    if caps.id_form is None:
        return {}
    out: dict[str, str] = {}
    n = 0
    for m in msgs:
        for c in m.get("tool_calls") or ():
            old = str(c.get("id") or "")
            name = (c.get("function") or {}).get("name", "")
            if caps.id_form == "kimi":
                new = old if re.fullmatch(r"functions\.[^:\s]+:\d+", old) else f"functions.{name}:{n}"
            else:
                new = old if re.fullmatch(r"[A-Za-z0-9]{9}", old) else _nine(old or f"{name}:{n}")
            out[old] = new
            n += 1
    return out


def _nine(text: str) -> str:
    digest = hashlib.sha256(text.encode()).digest()
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    return "".join(alphabet[b % len(alphabet)] for b in digest[:9])
