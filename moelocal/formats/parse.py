"""What a model said, taken apart as it streams: reasoning, the answer, and tool calls.

A parser is fed the generated text piece by piece (whatever the pieces: tokens, characters, random
chunks give the same result) and returns Deltas as soon as they are certain; text that could be the
start of a marker is held back until the next piece decides. ``finish()`` ends the stream and
returns the whole Message. Text in a form the parser does not recognise is content, never an error.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ToolCall:
    """One call the model made: ``arguments`` is a JSON string (as OpenAI's API carries it)."""

    id: str
    name: str
    arguments: str

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class Delta:
    """A piece of the answer: ``kind`` is "content" or "reasoning" (``text``) or "tool_call" (``call``,
    complete, and ``index``: its place among this answer's calls, from 0)."""

    kind: str
    text: str = ""
    call: ToolCall | None = None
    index: int = 0


@dataclass(frozen=True)
class Message:
    """A whole answer: the content, the reasoning apart from it, and the tool calls in order."""

    content: str = ""
    reasoning: str = ""
    tool_calls: tuple[ToolCall, ...] = ()

    def to_openai(self) -> dict[str, Any]:
        """The assistant message for the conversation history, in the shape templates read."""
        msg: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.reasoning:
            msg["reasoning_content"] = self.reasoning
        if self.tool_calls:
            msg["tool_calls"] = [c.to_openai() for c in self.tool_calls]
        return msg


# ---- the common machinery --------------------------------------------------------------------


class _Out:
    """One output channel (content or reasoning). With ``trim``, leading and trailing whitespace of the
    whole channel is dropped (the markup around it leaves newlines) and segments are kept apart by a
    blank line; trailing whitespace is held until more text shows it was inside."""

    def __init__(self, kind: str, trim: bool) -> None:
        self.kind = kind
        self.trim = trim
        self.parts: list[str] = []
        self.pending = ""  # whitespace held back
        self.gap = False  # a new segment starts: a separator before its first text

    def add(self, text: str, deltas: list[Delta]) -> None:
        if not text:
            return
        if not self.trim:
            self._emit(text, deltas)
            return
        if not self.parts:
            text = text.lstrip()
            self.gap = False
        elif self.gap:
            stripped = text.lstrip()
            if not stripped:
                return
            text = "\n\n" + stripped
            self.pending = ""
            self.gap = False
        text = self.pending + text
        body = text.rstrip()
        self.pending = text[len(body):]
        if body:
            self._emit(body, deltas)

    def segment(self) -> None:
        """What comes next is a new segment (another analysis message, text after a tool call)."""
        if self.trim and self.parts:
            self.gap = True

    def _emit(self, text: str, deltas: list[Delta]) -> None:
        self.parts.append(text)
        if deltas and deltas[-1].kind == self.kind and deltas[-1].call is None:
            deltas[-1] = Delta(self.kind, deltas[-1].text + text)
        else:
            deltas.append(Delta(self.kind, text))

    @property
    def text(self) -> str:
        return "".join(self.parts)


def _held(text: str, markers: Sequence[str]) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of one of ``markers``."""
    best = 0
    for m in markers:
        for k in range(min(len(m) - 1, len(text)), best, -1):
            if text.endswith(m[:k]):
                best = k
                break
    return best


def _first(text: str, markers: Sequence[str], start: int) -> tuple[int, str]:
    """(position, marker) of the earliest marker at or after ``start``; (-1, "") if none."""
    best, which = -1, ""
    for m in markers:
        i = text.find(m, start)
        if i >= 0 and (best < 0 or i < best):
            best, which = i, m
    return best, which


class Parser:
    """The incremental parser's interface (and the plain one: everything is content, untouched)."""

    def __init__(self, prompt: str = "", tools: Sequence[Mapping[str, Any]] | None = None) -> None:
        self.prompt = prompt
        self.buf = ""
        self.pos = 0
        self.content = _Out("content", trim=False)
        self.reasoning = _Out("reasoning", trim=True)
        self.calls: list[ToolCall] = []
        self.types = _param_types(tools)
        self.done = False

    def feed(self, piece: str) -> list[Delta]:
        """The deltas this piece of generated text makes certain (maybe none)."""
        if self.done or not piece:
            return []
        self.buf += piece
        deltas: list[Delta] = []
        self._run(deltas, final=False)
        self._compact()
        return deltas

    def flush(self) -> list[Delta]:
        """End of the stream: the deltas of what was held back. finish() calls it too."""
        if self.done:
            return []
        deltas: list[Delta] = []
        self._run(deltas, final=True)
        self.done = True
        return deltas

    def finish(self) -> Message:
        """End of the stream (if flush() was not called): the whole message."""
        self.flush()
        return Message(self.content.text, self.reasoning.text, tuple(self.calls))

    # ---- for subclasses ----------------------------------------------------------------------

    def _run(self, deltas: list[Delta], final: bool) -> None:
        self.content.add(self.buf[self.pos:], deltas)
        self.pos = len(self.buf)

    def _compact(self) -> None:
        if self.pos > 4096:  # what is consumed is never looked at again
            self.buf = self.buf[self.pos:]
            self.pos = 0

    def _call(self, name: str, arguments: Any, deltas: list[Delta], call_id: str | None = None) -> None:
        if isinstance(arguments, str):
            text = arguments.strip() or "{}"
        else:
            text = json.dumps(arguments, ensure_ascii=False)
        index = len(self.calls)
        call = ToolCall(call_id or _call_id(self.prompt, index, name), name, text)
        self.calls.append(call)
        self.content.segment()
        deltas.append(Delta("tool_call", call=call, index=index))


def _call_id(prompt: str, index: int, name: str) -> str:
    # deterministic, so that any chunking of the same answer gives the same ids; unique enough within
    # a conversation, whose every prompt differs
    digest = hashlib.sha256(f"{index}\0{name}\0{prompt}".encode()).hexdigest()
    return "call_" + digest[:24]


# ---- tool-call bodies ------------------------------------------------------------------------


def _param_types(tools: Sequence[Mapping[str, Any]] | None) -> dict[str, dict[str, Any]]:
    """function name -> {parameter: JSON-schema type} from OpenAI-style tools."""
    out: dict[str, dict[str, Any]] = {}
    for t in tools or ():
        fn = t.get("function", t) if isinstance(t, Mapping) else None
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
            continue
        props = (fn.get("parameters") or {}).get("properties") or {}
        out[fn["name"]] = {k: (v.get("type") if isinstance(v, Mapping) else None) for k, v in props.items()}
    return out


_JSONISH = re.compile(r"\s*([\[{\"]|-?\d|true\b|false\b|null\b)")


def _value(raw: str, kind: Any) -> Any:
    """A parameter written as text (XML formats), as the tool's schema types it."""
    if kind == "string" or (isinstance(kind, list) and "string" in kind and len(kind) == 1):
        return raw
    if kind is None and not _JSONISH.match(raw):
        return raw
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def _json_object(text: str) -> Any:
    """The JSON value at the start of ``text`` (trailing text allowed), or raise ValueError."""
    text = text.strip()
    if text.startswith("```"):  # a fenced block (DeepSeek-R1's old format)
        text = re.sub(r"^```[a-z]*\s*|\s*```\s*$", "", text)
    value, _ = json.JSONDecoder().raw_decode(text)
    return value


def _arguments(value: Any) -> Any:
    """Arguments as a model wrote them: an object, or a string holding one."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise ValueError("arguments are not JSON") from None
    if not isinstance(value, dict):
        raise ValueError("arguments are not an object")
    return value


_NAME = re.compile(r"[A-Za-z_][\w.\-:]*$")
_CODER_FN = re.compile(r"<function=([^>\s]+)>(.*?)(?:</function>|$)", re.S)
_CODER_PARAM = re.compile(r"<parameter=([^>\s]+)>(.*?)(?:</parameter>|(?=<parameter=)|$)", re.S)
_GLM_PAIR = re.compile(r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)(?:</arg_value>|$)", re.S)
_MINIMAX_PARAM = re.compile(r"<parameter name=\"([^\"]+)\">(.*?)(?:</parameter>|$)", re.S)


def _strip_nl(text: str) -> str:
    # XML formats put the value on its own lines: one newline either side is markup, not value
    if text.startswith("\n"):
        text = text[1:]
    if text.endswith("\n"):
        text = text[:-1]
    return text


class _Bodies:
    """Parsers of one call's body, per format; each returns (name, arguments, id or None) or raises."""

    def __init__(self, types: Mapping[str, Mapping[str, Any]]) -> None:
        self.types = types

    def tool_call_tag(self, body: str) -> tuple[str, Any, str | None]:
        """Inside <tool_call>…</tool_call>: Hermes JSON, Qwen3-Coder XML or GLM's arg_key/arg_value."""
        s = body.strip()
        if s.startswith("{") or s.startswith("```"):
            obj = _json_object(s)
            if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
                raise ValueError("no name")
            args = obj.get("arguments", obj.get("parameters", {}))
            return obj["name"], _arguments(args), None
        if "<function=" in s:
            return self.coder(s[s.index("<function="):])
        name, _, rest = s.partition("<arg_key>")
        name = name.strip()
        if not _NAME.match(name):
            raise ValueError("no function name")
        kinds = self.types.get(name, {})
        args = {k.strip(): _value(v.strip(), kinds.get(k.strip())) for k, v in _GLM_PAIR.findall("<arg_key>" + rest)} \
            if rest else {}
        return name, args, None

    def coder(self, body: str) -> tuple[str, Any, str | None]:
        m = _CODER_FN.match(body.strip())
        if not m:
            raise ValueError("no <function=NAME>")
        name = m.group(1)
        kinds = self.types.get(name, {})
        args = {k: _value(_strip_nl(v), kinds.get(k)) for k, v in _CODER_PARAM.findall(m.group(2))}
        return name, args, None

    def minimax(self, body: str) -> tuple[str, Any, str | None]:
        m = re.match(r"<invoke name=\"([^\"]+)\">(.*)", body.strip(), re.S)
        if not m:
            raise ValueError("no <invoke name=...>")
        name = m.group(1)
        kinds = self.types.get(name, {})
        args = {k: _value(_strip_nl(v), kinds.get(k)) for k, v in _MINIMAX_PARAM.findall(m.group(2))}
        return name, args, None

    def deepseek(self, body: str) -> tuple[str, Any, str | None]:
        head, sep, args = body.partition("<｜tool▁sep｜>")
        if not sep:
            raise ValueError("no tool separator")
        head = head.strip()
        if head == "function":  # R1 / V3: function<｜tool▁sep｜>NAME\n```json\n{...}\n```
            name, _, args = args.partition("\n")
        else:
            name = head
        name = name.strip()
        if not _NAME.match(name):
            raise ValueError("no function name")
        return name, _arguments(_json_object(args)), None

    def mistral(self, body: str) -> list[tuple[str, Any, str | None]]:
        """After [TOOL_CALLS]: a JSON list of {name, arguments} (Nemo) or NAME[ARGS]{json} (Small 3.2,
        Devstral, Ministral 3; with [CALL_ID]id before [ARGS] in some)."""
        s = body.strip()
        if s.startswith("["):
            items = _json_object(s)
            if not isinstance(items, list) or not items:
                raise ValueError("not a list of calls")
            out = []
            for it in items:
                if not isinstance(it, dict) or not isinstance(it.get("name"), str):
                    raise ValueError("a call without a name")
                out.append((it["name"], _arguments(it.get("arguments", {})), None))
            return out
        name, sep, rest = s.partition("[ARGS]")
        call_id = None
        if "[CALL_ID]" in name:
            name, _, call_id = name.partition("[CALL_ID]")
            call_id = call_id.strip() or None
        name = name.strip()
        if not sep or not _NAME.match(name):
            raise ValueError("no NAME[ARGS]")
        return [(name, _arguments(_json_object(rest)), call_id)]

    def kimi(self, body: str) -> tuple[str, Any, str | None]:
        head, sep, args = body.partition("<|tool_call_argument_begin|>")
        if not sep:
            raise ValueError("no argument marker")
        call_id = head.strip()
        m = re.match(r"(?:functions\.)?([^:\s]+)(?::\d+)?$", call_id)
        if not m:
            raise ValueError("no function name")
        return m.group(1), _arguments(_json_object(args)), call_id


# ---- <think> families and tool-call sections -------------------------------------------------


@dataclass(frozen=True)
class _Unit:
    begin: str
    end: str
    parse: str  # the _Bodies method
    keep_begin: bool = False  # the begin marker is part of the body (Qwen3-Coder's bare <function=)
    # no end marker: the unit runs to the next one's begin or the end of the answer (Mistral's [TOOL_CALLS])
    open_ended: bool = False


@dataclass(frozen=True)
class _Tools:
    units: tuple[_Unit, ...]
    section: tuple[str, str] | None = None  # calls grouped in one section (DeepSeek, Kimi, MiniMax)
    stray: tuple[str, ...] = ()  # closers left without their opener, dropped from the content


TOOL_SYNTAX: dict[str, _Tools] = {
    "hermes": _Tools((_Unit("<tool_call>", "</tool_call>", "tool_call_tag"),)),
    "glm": _Tools((_Unit("<tool_call>", "</tool_call>", "tool_call_tag"),)),
    # Qwen3-Coder models sometimes skip the first <tool_call> and go straight to <function=...>
    "qwen3-coder": _Tools((_Unit("<tool_call>", "</tool_call>", "tool_call_tag"),
                           _Unit("<function=", "</function>", "coder", keep_begin=True)), stray=("</tool_call>",)),
    "deepseek": _Tools((_Unit("<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "deepseek"),),
                       ("<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>")),
    "kimi": _Tools((_Unit("<|tool_call_begin|>", "<|tool_call_end|>", "kimi"),),
                   ("<|tool_calls_section_begin|>", "<|tool_calls_section_end|>")),
    "minimax": _Tools((_Unit("<invoke ", "</invoke>", "minimax", keep_begin=True),),
                      ("<minimax:tool_call>", "</minimax:tool_call>")),
    "mistral": _Tools((_Unit("[TOOL_CALLS]", "", "mistral", open_ended=True),)),
}


class TaggedParser(Parser):
    """Reasoning between two tags (``<think>…</think>``; the prompt may have opened it already) and
    tool calls in one of the TOOL_SYNTAX forms, in the content after it."""

    def __init__(self, prompt: str = "", tools: Sequence[Mapping[str, Any]] | None = None, *,
                 think: tuple[str, str] | None = None, in_reasoning: bool = False,
                 tool_syntax: str | None = None) -> None:
        super().__init__(prompt, tools)
        self.content = _Out("content", trim=True)
        self.think = think
        self.syntax = TOOL_SYNTAX.get(tool_syntax or "")
        self.bodies = _Bodies(self.types)
        self.state = "reasoning" if think and in_reasoning else ("start" if think else "content")
        self.unit: _Unit | None = None
        self.in_section = False

    def _openers(self) -> tuple[str, ...]:
        if self.syntax is None:
            return ()
        if self.syntax.section is not None:
            return (self.syntax.section[0],)
        return tuple(u.begin for u in self.syntax.units)

    def _run(self, deltas: list[Delta], final: bool) -> None:
        while True:
            text, i = self.buf, self.pos
            if self.state == "start":  # a think block may open the answer
                assert self.think is not None
                rest = text[i:].lstrip()
                opener = self.think[0]
                if rest.startswith(opener):
                    self.pos = len(text) - len(rest) + len(opener)
                    self.state = "reasoning"
                    continue
                if not final and opener.startswith(rest):
                    return  # nothing yet, or the start of the tag
                self.state = "content"
                continue
            if self.state == "reasoning":
                assert self.think is not None
                close = self.think[1]
                j = text.find(close, i)
                if j >= 0:
                    body = text[i:j]
                    if not self.reasoning.parts and body.lstrip().startswith(self.think[0]):
                        body = body.lstrip()[len(self.think[0]):]  # the prompt opened it and so did the model
                    self.reasoning.add(body, deltas)
                    self.pos = j + len(close)
                    self.state = "content"
                    continue
                keep = 0 if final else _held(text[i:], (close,))
                self.reasoning.add(text[i:len(text) - keep], deltas)
                self.pos = len(text) - keep
                return
            if self.state == "content":
                stray = self.syntax.stray if self.syntax is not None and self.calls else ()
                openers = self._openers() + stray
                j, marker = _first(text, openers, i)
                if j >= 0:
                    self.content.add(text[i:j], deltas)
                    if marker in stray:
                        self.pos = j + len(marker)
                        continue
                    if self.syntax is not None and self.syntax.section is not None:
                        self.pos = j + len(marker)
                        self.state = "section"
                        self.in_section = True
                    else:
                        self.pos = j
                        self.state = "unit"
                        self.in_section = False
                    continue
                keep = 0 if final else _held(text[i:], openers)
                self.content.add(text[i:len(text) - keep], deltas)
                self.pos = len(text) - keep
                return
            if self.state == "section":
                assert self.syntax is not None and self.syntax.section is not None
                end = self.syntax.section[1]
                j, marker = _first(text, (end, *(u.begin for u in self.syntax.units)), i)
                if j < 0:
                    if final:
                        self.content.add(text[i:], deltas)
                        self.pos = len(text)
                    return
                between = text[i:j]
                if between.strip():
                    self.content.add(between, deltas)
                if marker == end:
                    self.pos = j + len(end)
                    self.state = "content"
                    self.content.segment()
                else:
                    self.pos = j
                    self.state = "unit"
                continue
            if self.state == "unit":
                assert self.syntax is not None
                unit = next(u for u in self.syntax.units if text.startswith(u.begin, i))
                start = i + len(unit.begin)
                j = text.find(unit.begin if unit.open_ended else unit.end, start)
                if j < 0 and not final:
                    return
                stop = len(text) if j < 0 else j + (0 if unit.open_ended else len(unit.end))
                body = text[i if unit.keep_begin else start:len(text) if j < 0 else j]
                try:
                    found = getattr(self.bodies, unit.parse)(body)
                except ValueError:
                    self.content.add(text[i:stop], deltas)  # not a call after all: the text is content
                else:
                    for name, args, call_id in found if isinstance(found, list) else [found]:
                        self._call(name, args, deltas, call_id)
                self.pos = stop
                self.state = "section" if self.in_section else "content"
                if j < 0:
                    return
                continue
            return


# ---- harmony (gpt-oss) -----------------------------------------------------------------------


class HarmonyParser(Parser):
    """OpenAI's harmony messages: ``<|channel|>analysis<|message|>…<|end|>`` is reasoning, the final
    channel is the answer, and ``to=functions.NAME`` (in the header, before or after the channel) with
    ``<|message|>{json}<|call|>`` is a tool call. The prompt ends with ``<|start|>assistant``."""

    ENDS = ("<|end|>", "<|call|>", "<|return|>")
    STARTS = ("<|start|>", "<|channel|>")

    def __init__(self, prompt: str = "", tools: Sequence[Mapping[str, Any]] | None = None) -> None:
        super().__init__(prompt, tools)
        self.content = _Out("content", trim=True)
        self.state = "header" if prompt.rstrip().endswith("<|start|>assistant") else "outside"
        self.kind = "content"
        self.recipient = ""

    def _run(self, deltas: list[Delta], final: bool) -> None:
        while True:
            text, i = self.buf, self.pos
            if self.state == "outside":
                j, marker = _first(text, self.STARTS, i)
                if j >= 0:
                    self.content.add(text[i:j], deltas)
                    self.pos = j + len(marker) if marker == "<|start|>" else j
                    self.state = "header"
                    continue
                keep = 0 if final else _held(text[i:], self.STARTS)
                self.content.add(text[i:len(text) - keep], deltas)
                self.pos = len(text) - keep
                return
            if self.state == "header":
                j = text.find("<|message|>", i)
                if j < 0:
                    if final:
                        self.pos = len(text)  # a header cut short: nothing to show
                    return
                header = text[i:j]
                self.pos = j + len("<|message|>")
                self._open(header)
                self.state = "body"
                continue
            if self.state == "body":
                j, marker = _first(text, self.ENDS + self.STARTS, i)
                if self.kind in ("tool", "builtin"):
                    if j < 0 and not final:
                        return
                    body = text[i:j if j >= 0 else len(text)]
                    try:
                        args = _arguments(_json_object(body))
                    except ValueError:
                        if self.kind == "tool":
                            self.content.add(body, deltas)  # not JSON: the model's text, as it wrote it
                    else:
                        if self.kind == "tool":
                            self._call(self.recipient, args, deltas)
                else:
                    out = self.reasoning if self.kind == "reasoning" else self.content
                    if j < 0:
                        keep = 0 if final else _held(text[i:], self.ENDS + self.STARTS)
                        out.add(text[i:len(text) - keep], deltas)
                        self.pos = len(text) - keep
                        return
                    out.add(text[i:j], deltas)
                if j < 0:
                    self.pos = len(text)
                    return
                self.pos = j + len(marker) if marker in self.ENDS else j
                self.state = "outside"
                continue
            return

    def _open(self, header: str) -> None:
        """Read a message header (``assistant<|channel|>commentary to=functions.f <|constrain|>json``)."""
        m = re.search(r"to=([^\s<]+)", header)
        recipient = m.group(1) if m else ""
        m = re.search(r"<\|channel\|>\s*([A-Za-z_]+)", header)
        channel = m.group(1) if m else ""
        if recipient.startswith("functions."):
            self.kind = "tool"
            self.recipient = recipient[len("functions."):]
        elif recipient and recipient not in ("assistant", "user"):
            # a built-in tool nobody offered (python, browser.search, container.exec): neither the answer
            # nor a call the client could run, so it is left out (as llama-server does)
            self.kind = "builtin"
        elif channel == "analysis":
            self.kind = "reasoning"
            self.reasoning.segment()
        else:  # final, a commentary preamble for the user, or a channel we do not know
            self.kind = "content"
            self.content.segment()


ParserFactory = Callable[[str, Sequence[Mapping[str, Any]] | None], Parser]
