"""Chat templates rendered the way Hugging Face transformers renders them.

Model authors write and test their templates against transformers' ``apply_chat_template``: an
immutable Jinja sandbox with trim_blocks/lstrip_blocks, the loop-controls extension, a
``{% generation %}`` block (it marks the assistant's tokens for training; at inference it just renders
its body), and the globals ``raise_exception`` and ``strftime_now`` and a ``tojson`` filter that is
plain JSON (not HTML-escaped). Templates come with downloaded models, so they never reach Python
objects or mutate anything they were given. Unlike transformers' sandbox, a template may change the
lists and dicts it made itself (Kimi-K2's templates keep a queue of tool-call ids in a namespace list);
what the caller passed in stays immutable.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from contextvars import ContextVar
from datetime import datetime
from functools import lru_cache
from typing import Any

from moelocal.errors import EngineError


class JsonText(str):
    """Tool-call arguments as a JSON string, for templates that want a string: ``tojson`` leaves it as it
    is instead of encoding it again (Apriel writes ``arguments|tojson`` and would double-encode it)."""


class TemplateFailed(Exception):
    """A template raised (raise_exception, a syntax error, a sandbox violation); ``str()`` says why."""


def render_template(template: str, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True,
                    bos_token: str = "", eos_token: str = "", **extra: Any) -> str:
    """Render a Hugging Face chat template; an EngineError says why a template failed."""
    try:
        return render_raw(template, messages, add_generation_prompt=add_generation_prompt, bos_token=bos_token,
                          eos_token=eos_token, **extra)
    except TemplateFailed as exc:
        raise EngineError(f"the model's chat template failed: {exc}",
                          "the GGUF's tokenizer.chat_template is broken; report it to the model's authors") from None


def render_raw(template: str, messages: Sequence[Mapping[str, Any]], **variables: Any) -> str:
    """Render with the given variables; any failure of the template is a TemplateFailed."""
    import jinja2

    messages = list(messages)
    # (both stay alive through the render, so no id in the set can be reused by a new object)
    token = _INPUTS.set(frozenset(_ids(messages)) | frozenset(_ids(variables)))
    try:
        compiled = _compile(template)
        return compiled.render(messages=messages, **variables)
    except jinja2.TemplateError as exc:  # syntax errors, raise_exception(), sandbox violations
        raise TemplateFailed(str(exc) or type(exc).__name__) from None
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError, RecursionError) as exc:
        # what a template does to values of the wrong shape (``'str' + none``, ``items()`` of a string)
        raise TemplateFailed(f"{type(exc).__name__}: {exc}") from None
    finally:
        _INPUTS.reset(token)


# ids of the containers the caller handed to the template being rendered: those stay immutable
_INPUTS: ContextVar[frozenset[int]] = ContextVar("template_inputs", default=frozenset())


def _ids(value: Any) -> Iterator[int]:
    stack = [value]
    seen: set[int] = set()
    while stack:
        v = stack.pop()
        if isinstance(v, (dict, list, set)) and id(v) not in seen:
            seen.add(id(v))
            yield id(v)
            stack.extend(v.values() if isinstance(v, dict) else v)
        elif isinstance(v, tuple):
            stack.extend(v)


@lru_cache(maxsize=128)
def _compile(template: str):
    return environment().from_string(template)


@lru_cache(maxsize=1)
def environment():
    """The sandboxed Jinja environment every template is rendered in (built once)."""
    import jinja2
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment, SandboxedEnvironment, modifies_known_mutable

    class Sandbox(ImmutableSandboxedEnvironment):
        def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
            if not SandboxedEnvironment.is_safe_attribute(self, obj, attr, value):
                return False
            return not modifies_known_mutable(obj, attr) or id(obj) not in _INPUTS.get()

    class Generation(Extension):
        """``{% generation %}...{% endgeneration %}``: renders its body (transformers uses it to find the
        assistant's tokens for training masks; nothing to do at inference)."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body, lineno=lineno)

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
        # transformers' tojson: json.dumps with its options, not Jinja's HTML-escaping one
        if isinstance(value, JsonText):
            return str(value)
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys, default=_jsonable)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = Sandbox(trim_blocks=True, lstrip_blocks=True, loader=jinja2.BaseLoader(),
                                        extensions=[Generation, "jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.filters["tojson"] = tojson
    return env


def _jsonable(value: Any) -> Any:
    # Jinja's Undefined and other odd values a template may hand to tojson
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, (tuple, set)):
        return list(value)
    return None if value is None or type(value).__name__.endswith("Undefined") else str(value)
