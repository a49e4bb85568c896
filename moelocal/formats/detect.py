"""Which conversation format a model speaks, read from its chat template and its vocabulary."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from moelocal.formats.parse import HarmonyParser, Parser, TaggedParser

# Reasoning tags, in the order they are looked for (the first pair the template uses wins).
THINK_TAGS: tuple[tuple[str, str], ...] = (
    ("<seed:think>", "</seed:think>"),  # ByteDance Seed-OSS
    ("<think>", "</think>"),  # Qwen3, Qwen3.5, DeepSeek-R1/V3.1, GLM-4.5/4.6, Kimi-K2-Thinking, MiniMax-M2 ...
    ("[THINK]", "[/THINK]"),  # Mistral's reasoning models
    ("<|START_THINKING|>", "<|END_THINKING|>"),  # Command-R7B
)
HARMONY_TOKENS = ("<|start|>", "<|channel|>", "<|message|>")


@dataclass(frozen=True)
class ChatFormat:
    """How a model's answers are laid out.

    ``reasoning``: "think" (between ``think_tags``), "harmony" (gpt-oss channels) or None.
    ``tools``: the tool-call syntax ("hermes", "qwen3-coder", "glm", "deepseek", "kimi", "minimax",
    "mistral", "harmony") or None. ``thinking_toggle``: the template reads ``enable_thinking``; ``effort``: it reads
    ``reasoning_effort``.
    """

    reasoning: str | None = None
    tools: str | None = None
    thinking_toggle: bool = False
    effort: bool = False
    think_tags: tuple[str, str] = ("<think>", "</think>")

    @property
    def name(self) -> str:
        """For people: "think + hermes tool calls", "harmony", "plain"."""
        if self.reasoning == "harmony":
            return "harmony"
        parts = [self.think_tags[0] + " reasoning"] if self.reasoning == "think" else []
        if self.tools:
            parts.append(f"{self.tools} tool calls")
        return " + ".join(parts) or "plain"

    @property
    def known(self) -> bool:
        return self.reasoning is not None or self.tools is not None

    def starts_in_reasoning(self, prompt: str) -> bool:
        """Whether the prompt's generation prompt opened the reasoning block (Qwen3.5, DeepSeek-V3.1 and
        MiniMax-M2 end it with ``<think>``): then the answer starts inside the reasoning."""
        if self.reasoning != "think":
            return False
        opener, closer = self.think_tags
        i = prompt.rfind(opener)
        return i >= 0 and i > prompt.rfind(closer) and not prompt[i + len(opener):].strip()

    def parser(self, prompt: str = "", tools: Sequence[Mapping[str, Any]] | None = None) -> Parser:
        """A fresh incremental parser for the answer to ``prompt`` (the rendered text the model
        continues). ``tools`` (OpenAI shape) type the parameters of XML tool-call formats."""
        if self.reasoning == "harmony" or self.tools == "harmony":
            return HarmonyParser(prompt, tools)
        if not self.known:
            return Parser(prompt, tools)
        return TaggedParser(prompt, tools, think=self.think_tags if self.reasoning == "think" else None,
                            in_reasoning=self.starts_in_reasoning(prompt), tool_syntax=self.tools)


PLAIN = ChatFormat()


def detect_format(template: str | None, special_tokens: Collection[str] = ()) -> ChatFormat:
    """The format a template (and the vocabulary's special tokens) says the model speaks.

    The template is the evidence: it writes the markup into earlier turns and generation prompts.
    The vocabulary decides when the template says nothing (a GGUF without a template of its own) and
    confirms harmony, whose markers are special tokens.
    """
    t = template or ""
    specials = set(special_tokens)
    toggle = "enable_thinking" in t
    effort = "reasoning_effort" in t
    if ("<|channel|>" in t and "<|message|>" in t) or (not _has_family(t)
                                                       and all(s in specials for s in HARMONY_TOKENS)):
        return ChatFormat("harmony", "harmony", toggle, effort)
    tags = next((p for p in THINK_TAGS if p[1] in t), None)
    if tags is None and not _has_family(t):
        tags = next((p for p in THINK_TAGS if p[0] in specials and p[1] in specials), None)
    return ChatFormat("think" if tags else None, _tool_syntax(t, specials), toggle, effort,
                      tags or ("<think>", "</think>"))


def _tool_syntax(t: str, specials: set[str]) -> str | None:
    if "<｜tool▁calls▁begin｜>" in t:
        return "deepseek"
    if "<|tool_calls_section_begin|>" in t:
        return "kimi"
    if "<minimax:tool_call>" in t:
        return "minimax"
    if "<arg_key>" in t:
        return "glm"
    if "<function=" in t and "<parameter=" in t:
        return "qwen3-coder"
    if "<tool_call>" in t:
        return "hermes"
    if "[TOOL_CALLS]" in t:
        return "mistral"
    if not _has_family(t) and "<tool_call>" in specials and "</tool_call>" in specials:
        return "hermes"
    return None


def _has_family(t: str) -> bool:
    """Whether the template is a real one (not missing, not moelocal's ChatML stand-in)."""
    from moelocal.formats.render import CHATML_TEMPLATE

    return bool(t.strip()) and t != CHATML_TEMPLATE
