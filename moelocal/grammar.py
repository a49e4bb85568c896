"""Structured output: JSON schemas and OpenAI ``response_format`` objects as llama.cpp grammars.

The conversion is llama-cpp-python's own port of llama.cpp's json_schema_to_grammar
(``llama_cpp.llama_grammar.json_schema_to_gbnf``): maintained with the grammar engine it feeds, so
moelocal writes none of its own. The GBNF text goes into SamplingParams.grammar, and the engine puts
llama.cpp's grammar sampler first in the chain. Pure functions; nothing here loads a model.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from moelocal.errors import UsageError


def schema_grammar(schema: Any) -> str:
    """The GBNF grammar of the JSON documents ``schema`` (a JSON schema, as a parsed object) allows.

    Raises UsageError with one line saying what is wrong when the schema cannot be converted."""
    if isinstance(schema, bool):
        schema = {} if schema else None
    if not isinstance(schema, dict):
        raise UsageError(f"a JSON schema must be an object, not {type(schema).__name__}")
    return _convert(json.dumps(schema))  # (not sorted: the order of properties is the order written)


@lru_cache(maxsize=64)
def _convert(text: str) -> str:
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        rules = json_schema_to_gbnf(text)
    except RecursionError:
        raise UsageError("the JSON schema refers to itself without end") from None
    except Exception as exc:  # the converter asserts, and raises KeyError for unknown $refs
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if isinstance(exc, KeyError):
            why = f"unresolved reference {why}"
        raise UsageError(f"the JSON schema cannot be turned into a grammar: {why}") from None
    # llama-cpp-python 0.3.36's string character lets control characters through, which JSON
    # forbids unescaped; llama.cpp's own converter (common/json-schema-to-grammar.cpp) excludes them
    return "\n".join(_STRICT_CHAR if line.startswith(_LOOSE_CHAR) else line for line in rules.split("\n"))


_LOOSE_CHAR = r'char ::= [^"\\] |'
_STRICT_CHAR = r'char ::= [^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4})'


def json_object_grammar() -> str:
    """Any JSON object (OpenAI's ``{"type": "json_object"}``)."""
    return schema_grammar({"type": "object"})


def response_format_grammar(response_format: Any) -> str | None:
    """The grammar an OpenAI ``response_format`` asks for, or None for plain text.

    Accepts ``{"type": "text"}``, ``{"type": "json_object"}`` (with an optional ``schema``, as
    llama-server does) and ``{"type": "json_schema", "json_schema": {"schema": {...}}}``. Raises
    UsageError naming what is wrong."""
    if response_format is None:
        return None
    if not isinstance(response_format, Mapping):
        raise UsageError("'response_format' must be an object such as {\"type\": \"json_object\"}")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        schema = response_format.get("schema")
        return json_object_grammar() if schema is None else schema_grammar(schema)
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, Mapping) or "schema" not in spec:
            raise UsageError("'response_format.json_schema' must be an object with a 'schema'")
        return schema_grammar(spec["schema"])
    raise UsageError(f"'response_format.type' must be text, json_object or json_schema; got {kind!r}")


# Tool-call syntaxes a grammar can force (moelocal.formats' ChatFormat.tools): how one call is written.
_CALL_SYNTAX = {"hermes": ('"<tool_call>\\n" call "\\n</tool_call>"', '"\\n"')}


def tool_call_grammar(syntax: str | None, tools: Sequence[Mapping[str, Any]]) -> str | None:
    """A grammar that makes the answer one or more calls of ``tools`` (OpenAI function tools), each
    ``{"name": ..., "arguments": ...}`` with arguments valid for its parameters, in the model's
    tool-call ``syntax``; None where moelocal knows no grammar for that syntax (the answer is then
    left free). For ``tool_choice: "required"`` or a named function."""
    if syntax not in _CALL_SYNTAX or not tools:
        return None
    one_of = [{"type": "object", "properties": {"name": {"const": t["function"]["name"]},
                                                "arguments": t["function"].get("parameters") or {"type": "object"}},
               "required": ["name", "arguments"]} for t in tools]
    rules = schema_grammar(one_of[0] if len(one_of) == 1 else {"anyOf": one_of})
    call, sep = _CALL_SYNTAX[syntax]
    # the schema's root becomes one call's JSON; the new root repeats the call in the model's markup
    body = "\n".join("call ::=" + line[len("root ::="):] if line.startswith("root ::=") else line
                      for line in rules.split("\n"))
    return f"root ::= one ({sep} one)*\none ::= {call}\n{body}"


def read_schema(path: str | Path) -> Any:
    """A JSON schema from a file, or a UsageError that says why it cannot be read."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path} is not JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") from None


__all__ = ["json_object_grammar", "read_schema", "response_format_grammar", "schema_grammar", "tool_call_grammar"]
