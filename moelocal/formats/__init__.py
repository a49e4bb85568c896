"""Conversation formats: chat templates as Hugging Face renders them (with llama.cpp-style
adaptations where a template rejects a message), and the parsers that take a model's answer apart
into reasoning, content and tool calls. Pure Python over Jinja2: no llama.cpp here.

    fmt = detect_format(template, special_tokens)
    text, notes = render_chat(fmt, template, messages, tools=tools, enable_thinking=True)
    p = fmt.parser(text, tools)
    for piece in generated: deltas = p.feed(piece)
    deltas = p.flush(); msg = p.finish()
"""

from moelocal.formats.detect import PLAIN, THINK_TAGS, ChatFormat, detect_format
from moelocal.formats.jinja import TemplateFailed, render_raw, render_template
from moelocal.formats.parse import Delta, HarmonyParser, Message, Parser, TaggedParser, ToolCall
from moelocal.formats.render import CHATML_TEMPLATE, Caps, probe, render_chat

__all__ = [
    "CHATML_TEMPLATE",
    "PLAIN",
    "THINK_TAGS",
    "Caps",
    "ChatFormat",
    "Delta",
    "HarmonyParser",
    "Message",
    "Parser",
    "TaggedParser",
    "TemplateFailed",
    "ToolCall",
    "detect_format",
    "probe",
    "render_chat",
    "render_raw",
    "render_template",
]
