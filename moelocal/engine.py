"""The engine: load a model with a Plan, then generate as a stream of small records.

Loading applies the plan exactly as `fit` computed it (GPU layers, expert overrides, devices, split,
context, KV type, flash attention, batch sizes, threads) through llama.cpp's own C API, then reads
back what llama.cpp says it allocated. Generation yields ``Chunk`` records: chat, generate, batch
(and a server) only consume them. Nothing here prints.
"""

from __future__ import annotations

import codecs
import contextlib
import ctypes
import os
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from moelocal import config, native, rpc
from moelocal.errors import EngineError, UsageError
from moelocal.formats import CHATML_TEMPLATE, ChatFormat, detect_format, render_template
from moelocal.formats import render_chat as _render_chat
from moelocal.hardware import default_threads
from moelocal.plan import DeviceMemory, Plan

# Buffers llama.cpp reports may differ from the plan by this share before anyone is warned
# (the planner keeps the same share of every device free), and always by this many bytes: the
# log rounds to 0.01 MiB and small models have fixed costs the memory model does not itemize.
MEMORY_MARGIN = 0.05
MEMORY_SLACK = 64 << 20


# What a run uses where neither the user nor the model's GGUF says (llama.cpp's own defaults).
SAMPLING_DEFAULTS: dict[str, float | int] = {"temperature": 0.8, "top_p": 0.95, "top_k": 40, "min_p": 0.05,
                                             "repeat_penalty": 1.0, "penalty_last_n": 64}
# The model authors' recommendations newer GGUFs carry (llama.cpp's LLM_KV_GENERAL_SAMPLING_*), read
# as llama.cpp's common_params_sampling does: key -> (SamplingParams field, type).
GGUF_SAMPLING_KEYS: dict[str, tuple[str, type]] = {
    "general.sampling.temp": ("temperature", float),
    "general.sampling.top_k": ("top_k", int),
    "general.sampling.top_p": ("top_p", float),
    "general.sampling.min_p": ("min_p", float),
    "general.sampling.penalty_repeat": ("repeat_penalty", float),
    "general.sampling.penalty_last_n": ("penalty_last_n", int),
}


@dataclass(frozen=True)
class SamplingParams:
    """How tokens are drawn. ``temperature <= 0`` is greedy; ``seed=None`` draws a random seed.

    A field left None takes the model's recommendation (its GGUF's ``general.sampling.*``), else
    SAMPLING_DEFAULTS: see :meth:`resolved`. ``grammar`` (GBNF, see moelocal.grammar) constrains
    every token drawn.
    """

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    max_tokens: int = 512
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # keep going past end-of-generation tokens (benchmarks)
    repeat_penalty: float | None = None  # 1.0: off
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from every token seen in the last n
    frequency_penalty: float = 0.0  # ... and this much more for every time it was seen
    penalty_last_n: int | None = None  # how many recent tokens the penalties look at (-1: the context)
    grammar: str | None = None

    def resolved(self, recommended: Mapping[str, float | int] | None = None) -> SamplingParams:
        """These params with every unset field filled: the model's recommendation, else the default."""
        rec = recommended or {}
        changes = {k: rec.get(k, d) for k, d in SAMPLING_DEFAULTS.items() if getattr(self, k) is None}
        return replace(self, **changes) if changes else self

    def check(self) -> SamplingParams:
        """The same params, or a UsageError naming the value that is out of range."""
        if self.max_tokens < 1:
            raise UsageError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise UsageError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.temperature is not None and self.temperature < 0:
            raise UsageError(f"temperature must be 0 or more, got {self.temperature}")
        if self.min_p is not None and not 0.0 <= self.min_p <= 1.0:
            raise UsageError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.top_k is not None and self.top_k < 0:
            raise UsageError(f"top_k must be 0 (off) or more, got {self.top_k}")
        if self.repeat_penalty is not None and self.repeat_penalty <= 0:
            raise UsageError(f"repeat_penalty must be above 0 (1 is off), got {self.repeat_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise UsageError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if self.penalty_last_n is not None and self.penalty_last_n < -1:
            raise UsageError(f"penalty_last_n must be -1 (the whole context) or more, got {self.penalty_last_n}")
        if self.seed is not None and not 0 <= self.seed < 2**32 - 1:
            raise UsageError(f"seed must be in [0, 2^32 - 2], got {self.seed}")
        return self


def recommended_sampling(meta: Mapping[str, str]) -> dict[str, float | int]:
    """The sampling a GGUF's metadata recommends (``general.sampling.*``, values as llama.cpp prints
    them), as SamplingParams fields; values that do not parse are left out, as llama.cpp does."""
    out: dict[str, float | int] = {}
    for key, (name, kind) in GGUF_SAMPLING_KEYS.items():
        raw = meta.get(key)
        if raw is None:
            continue
        try:
            out[name] = kind(float(raw)) if kind is int else kind(raw)
        except ValueError:
            continue
    return out


@dataclass(frozen=True)
class Chunk:
    """One step of generation: the text it added and the counters so far.

    ``finish_reason`` is None until the last record of a request: then "stop" (end of turn or a
    stop string), "length" (max_tokens or the context is full), "cancelled" (generate_many's cancel
    hook) or "error" (``text`` says why).
    ``index`` tells requests apart when several run at once.
    """

    text: str
    index: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens reused from the previous request's KV cache
    completion_tokens: int = 0
    prompt_seconds: float = 0.0  # processing the prompt, up to the first token's logits
    generation_seconds: float = 0.0  # from then to this record
    finish_reason: str | None = None
    seed: int | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def prompt_tps(self) -> float:
        n = self.prompt_tokens - self.cached_tokens
        return n / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    @property
    def generation_tps(self) -> float:
        # the first token came with the prompt's logits: the generation phase decoded the others
        n = self.completion_tokens - 1
        return n / self.generation_seconds if self.generation_seconds > 0 and n > 0 else 0.0

    @property
    def seconds(self) -> float:
        return self.prompt_seconds + self.generation_seconds


@dataclass(frozen=True)
class Deviation:
    """A device where llama.cpp allocated noticeably more or less than the plan said."""

    device: str
    planned: int
    measured: int

    @property
    def ratio(self) -> float:
        return self.measured / self.planned if self.planned else float("inf")


# ---- small pure helpers ----------------------------------------------------------------------


def extra_bufts_default(cpu_extra_bufts: Sequence[str]) -> bool:
    """Whether llama.cpp may repack CPU weights into its extra buffer types, given the ones it has.

    Repacking is llama.cpp's own default and pays on CPUs without AMX (Q4_0 on AVX-512 measured
    1.5x faster prompts and 1.3-1.4x faster generation with scripts/bench_engine.py
    --ab-extra-bufts; F16 and Q8_0 are not repacked there and ran the same). But llama.cpp 0.3.36's
    AMX buffer type crashes on any batch of two or more tokens, so where it exists: off.
    """
    return "AMX" not in cpu_extra_bufts


def measured_memory(
    report: native.BufferReport, buft_devices: Mapping[str, str] | None = None
) -> dict[str, DeviceMemory]:
    """Bytes per plan device from llama.cpp's buffer report, in the plan's categories."""
    acc: dict[str, dict[str, int]] = {}
    field_of = {"model": "weights", "kv": "kv", "rs": "kv", "compute": "compute", "output": "output"}
    for b in report.buffers:
        dev = native.buffer_device(b.name, dict(buft_devices or {}))
        slot = acc.setdefault(dev, {})
        key = field_of[b.kind]
        slot[key] = slot.get(key, 0) + b.bytes
    return {d: DeviceMemory(**v) for d, v in acc.items()}


def compare_memory(
    planned: Mapping[str, DeviceMemory],
    measured: Mapping[str, DeviceMemory],
    margin: float = MEMORY_MARGIN,
    slack: int = MEMORY_SLACK,
) -> list[Deviation]:
    """Devices whose allocations differ from the plan by more than the margin.

    The plan's ``overhead`` (driver context, fragmentation) is something llama.cpp never reports,
    so it is left out of the comparison.
    """
    out = []
    for dev in sorted(set(planned) | set(measured)):
        p = planned.get(dev, DeviceMemory())
        m = measured.get(dev, DeviceMemory())
        want = p.total - p.overhead
        got = m.total - m.overhead
        if abs(got - want) > max(margin * want, slack):
            out.append(Deviation(dev, want, got))
    return out


def fit_messages(
    messages: Sequence[Mapping[str, str]], count: Callable[[Sequence[Mapping[str, str]]], int], limit: int
) -> tuple[list[dict[str, str]], int]:
    """Drop the oldest turns (never the system message, never the last message) until the rendered
    conversation takes at most ``limit`` tokens. Returns (messages, how many were dropped)."""
    msgs = [dict(m) for m in messages]
    dropped = 0
    while count(msgs) > limit:
        first = 1 if msgs and msgs[0].get("role") == "system" else 0
        if len(msgs) - first <= 1:
            break  # only the newest message is left: nothing more to drop
        # drop a whole exchange (user + assistant) so roles keep alternating
        n = 2 if len(msgs) - first > 2 and msgs[first + 1].get("role") == "assistant" else 1
        del msgs[first : first + n]
        dropped += n
    return msgs, dropped


# ---- chat templates --------------------------------------------------------------------------


# render_template and CHATML_TEMPLATE live in moelocal.formats (imported above): engine.py is about tokens.


# ---- the engine ------------------------------------------------------------------------------


class _Stream:
    """Turns sampled tokens into text: UTF-8 split across tokens, end of generation, stop strings."""

    __slots__ = ("is_end", "to_bytes", "decode", "params", "held", "n", "finish", "stops")

    def __init__(self, engine: Engine, params: SamplingParams) -> None:
        vocab, is_eog = engine._vocab, engine._is_eog
        self.is_end = (lambda token: False) if params.ignore_eos else (lambda token: is_eog(vocab, token))
        self.to_bytes = engine.token_bytes
        self.decode = codecs.getincrementaldecoder("utf-8")("replace").decode
        self.params = params  # max_tokens is read at every token (moelocal.server cancels through it)
        self.held = ""  # text that might be the start of a stop string
        self.n = 0
        self.finish: str | None = None
        self.stops = tuple(s for s in params.stop if s)

    def feed(self, token: int) -> str:
        """Text this token adds (maybe ""), setting ``finish`` when generation should end."""
        if self.is_end(token):
            self.finish = "stop"
            return self.flush()
        self.n += 1
        text = self.decode(self.to_bytes(token))
        if self.stops:
            text = self.held + text
            for s in self.stops:
                i = text.find(s)
                if i >= 0:
                    self.finish = "stop"
                    self.held = ""
                    return text[:i]
            keep = _stop_prefix_len(text, self.stops)
            self.held = text[len(text) - keep :] if keep else ""
            text = text[: len(text) - keep] if keep else text
        if self.n >= self.params.max_tokens:
            self.finish = "length"
            text += self.flush()
        return text

    def flush(self) -> str:
        out = self.held + self.decode(b"", final=True)
        self.held = ""
        return out


def _stop_prefix_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if s.startswith(text[-k:]):
                best = k
                break
    return best


# What generate_many runs: (prompt, params) or (prompt, params, cancelled).
Request = tuple


@dataclass
class _Slot:
    """One request in a multi-sequence run."""

    index: int
    seq: int
    prompt: list[int]
    params: SamplingParams
    sampler: Any
    stream: _Stream
    seed: int
    fed: int = 0  # prompt tokens sent to llama_decode so far
    pos: int = 0
    pending: int | None = None  # sampled token still to be decoded
    logit_row: int = -1  # where this request's logits sit in the last batch
    t0: float = field(default_factory=time.perf_counter)
    t_prompt: float = 0.0
    cancelled: Callable[[], bool] | None = None


class Engine:
    """A loaded model and its context. Use ``Engine.load(path, plan)``; close it (or use ``with``)."""

    def __init__(self) -> None:  # built by load()
        self.model = None
        self.ctx = None
        self.plan: Plan
        self.path: Path
        self.report = native.BufferReport()
        self.extra_bufts = False
        self.buffer_devices: dict[str, str] = {}
        self.workers: tuple[str, ...] = ()
        self._live = False
        self._watchdog: rpc.Watchdog | None = None
        self._arrays: native.NativeArrays | None = None
        self._cached: list[int] | None = []  # tokens in sequence 0's KV cache (None: unknown)
        # recurrent layers cannot be rolled back: their state after the last prompt, and its tokens
        self._recurrent = False
        self._checkpoint: tuple[list[int], bytearray] | None = None
        self._interrupted = False  # Ctrl-C during a prompt (_interruptible)
        self._template: str | None = None
        self._specials: tuple[str, ...] | None = None
        self._format: ChatFormat | None = None
        self.template_notes: list[str] = []  # adaptations the template needed, each once (new_notes())
        self._notes_shown = 0
        self.recommended: dict[str, float | int] = {}  # the GGUF's general.sampling.* (SamplingParams fields)
        self.n_vocab = 0
        self._piece = ctypes.create_string_buffer(256)

    # ---- loading -----------------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        plan: Plan,
        *,
        extra_bufts: bool | None = None,
        progress: Callable[[float], None] | None = None,
        workers: Sequence[str] = (),
    ) -> Engine:
        """Load ``path`` (any shard of a split set: llama.cpp finds the rest) placed as ``plan`` says.

        ``extra_bufts`` lets llama.cpp repack CPU weights into its extra buffer types (CPU_REPACK,
        AMX); None decides by :func:`extra_bufts_default` (off where the AMX one exists, and for
        plans that page weights in from disk). ``progress`` is called with 0..1 while loading.
        ``workers`` are the RPC workers (host:port) whose devices the plan calls rpc0, rpc1 ...,
        in the order the plan was made with (see hardware.with_workers).
        """
        lc = native.llama()
        native.install_log()
        _backend_init()
        self = cls()
        self.path = Path(path)
        self.plan = plan
        p, o = plan.placement, plan.options
        if extra_bufts is None:
            extra_bufts = not p.from_disk and extra_bufts_default(native.cpu_extra_buffer_types())
        self.extra_bufts = extra_bufts
        _check_options(plan)
        on_gpu = bool(p.devices) and p.n_gpu_layers > 0
        # workers only when the plan uses them: connecting is not free, and each serves one client
        remote = on_gpu and any(d.startswith("rpc") for d in p.devices)
        worker_timeout = config.worker_timeout() if remote else 0.0  # a bad setting fails before the load
        named, remote_bufts, self.workers = _connect_workers(workers if remote else ())
        mp, self._arrays = native.model_params(p, extra_bufts=extra_bufts, named=named)

        def on_progress(value: float, _user: ctypes.c_void_p) -> bool:
            if progress is not None:
                try:
                    progress(float(value))
                except Exception:  # never unwind into C; a broken bar must not abort the load
                    pass
            return True

        cb = lc.llama_progress_callback(on_progress)
        mp.progress_callback = cb
        with native.capture_log() as lines:
            self.model = lc.llama_model_load_from_file(os.fsencode(self.path), mp)
            if not self.model:
                why = native.last_error(lines) or "see MOELOCAL_DEBUG=1 for llama.cpp's log"
                raise EngineError(f"llama.cpp could not load {self.path.name}: {why}",
                                  "check that the file is a complete GGUF model this llama.cpp supports")
            self._vocab = lc.llama_model_get_vocab(self.model)
            threads = o.n_threads or default_threads()
            cp = native.context_params(o, threads)
            self.ctx = lc.llama_init_from_model(self.model, cp)
            if not self.ctx:
                why = native.last_error(lines) or "see MOELOCAL_DEBUG=1 for llama.cpp's log"
                self.close()
                raise EngineError(f"llama.cpp could not create a context for {self.path.name}: {why}",
                                  "try a smaller --ctx")
        self.report = native.parse_buffer_report(lines)
        self.buffer_devices = {**native.buffer_type_devices(), **remote_bufts}
        if self.workers:
            _LIVE_WORKERS.update(self.workers)
            self._live = True
            rpc.keep_alive(self.workers)
            self._watchdog = rpc.Watchdog(self.workers, worker_timeout)
        self._mem = lc.llama_get_memory(self.ctx)
        self._recurrent = bool(lc.llama_model_is_recurrent(self.model) or lc.llama_model_is_hybrid(self.model))
        self.n_ctx = lc.llama_n_ctx(self.ctx)
        self.n_seq_max = lc.llama_n_seq_max(self.ctx)
        self.n_ctx_seq = lc.llama_n_ctx_seq(self.ctx)  # n_ctx / n_seq_max: each sequence's own stream
        self.n_batch = lc.llama_n_batch(self.ctx)
        self.n_threads = threads
        # bound once: generation calls these per token
        self._is_eog = lc.llama_vocab_is_eog
        self._to_piece = lc.llama_token_to_piece
        self._decode = self._watchdog.wrap(lc.llama_decode) if self._watchdog else lc.llama_decode
        self._sample = lc.llama_sampler_sample
        self._batch_one = lc.llama_batch_get_one
        self.n_vocab = lc.llama_vocab_n_tokens(self._vocab)
        self.recommended = recommended_sampling(self._meta(GGUF_SAMPLING_KEYS))
        return self

    def _meta(self, keys: Iterable[str]) -> dict[str, str]:
        """The model's metadata values (as llama.cpp prints them) for those of ``keys`` it has."""
        lc = native.llama()
        buf = ctypes.create_string_buffer(256)
        out = {}
        for key in keys:
            n = lc.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
            if n >= 0:
                out[key] = buf.value.decode("utf-8", "replace")
        return out

    def sampling(self, params: SamplingParams) -> SamplingParams:
        """What a run with ``params`` uses: unset fields from the model's recommendation, else the defaults."""
        return params.resolved(self.recommended).check()

    def check_grammar(self, grammar: str) -> None:
        """A UsageError if llama.cpp cannot parse ``grammar`` (GBNF), before any request runs it."""
        lc = native.llama()
        g = lc.llama_sampler_init_grammar(self._vocab, grammar.encode(), b"root")
        if not g:
            raise UsageError(f"llama.cpp cannot parse the grammar: {native.last_error() or 'see its log'}")
        lc.llama_sampler_free(g)

    def close(self) -> None:
        lc = native.llama()
        if self.ctx:
            lc.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            lc.llama_model_free(self.model)
            self.model = None
        self._arrays = None  # only now may the override strings go
        if self._watchdog:
            self._watchdog.close()
            self._watchdog = None
        if self._live:  # llama.cpp has closed its connections to the workers with the last buffer
            _LIVE_WORKERS.subtract(self.workers)
            self._live = False

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # ---- what was loaded ---------------------------------------------------------------------

    @property
    def overridden(self) -> tuple[tuple[str, str], ...]:
        """(tensor, buffer type) for every tensor a plan override moved, as llama.cpp logged it."""
        return self.report.overridden

    @property
    def memory(self) -> dict[str, DeviceMemory]:
        """What llama.cpp allocated per plan device (weights, KV, compute, output)."""
        return measured_memory(self.report, self.buffer_devices)

    def deviations(self, margin: float = MEMORY_MARGIN, slack: int = MEMORY_SLACK) -> list[Deviation]:
        """Devices where llama.cpp's buffers differ from the plan by more than the margin."""
        return compare_memory(self.plan.memory, self.memory, margin, slack)

    def expert_location(self, n_layer: int) -> str:
        """Where the routed experts live, for people: 'RAM', 'GPU', 'RAM (12 of 48 layers) + GPU'.

        A layer's experts are in RAM when llama.cpp moved them there (its log) or the layer is not
        offloaded at all (the plan's -ngl, by llama.cpp's rule in layout.layer_devices)."""
        from moelocal import layout

        p = self.plan.placement
        if not p.devices or p.n_gpu_layers == 0:
            return "RAM (CPU only)"
        on_cpu = layout.layer_devices(n_layer, p)
        in_ram = {il for il in range(n_layer) if on_cpu[il] == "cpu"}
        in_ram |= {int(t.split(".")[1]) for t, _ in self.overridden if t.startswith("blk.") and "_exps" in t}
        remote = [d.startswith("rpc") for d in p.devices]
        other = "worker" if all(remote) else ("GPU + worker" if any(remote) else "GPU")
        if len(in_ram) >= n_layer:
            return "RAM"
        if in_ram:
            return f"RAM ({len(in_ram)} of {n_layer} layers) + {other}"
        return other

    # ---- tokens ------------------------------------------------------------------------------

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> list[int]:
        lc = native.llama()
        raw = text.encode("utf-8")
        cap = len(raw) + 8
        buf = (lc.llama_token * cap)()
        n = lc.llama_tokenize(self._vocab, raw, len(raw), buf, cap, add_special, parse_special)
        if n < 0:
            cap = -n
            buf = (lc.llama_token * cap)()
            n = lc.llama_tokenize(self._vocab, raw, len(raw), buf, cap, add_special, parse_special)
        return list(buf[:n])

    def token_bytes(self, token: int, special: bool = True) -> bytes:
        """A token's bytes. Special tokens are rendered (``<|channel|>``, ``<think>``): the conversation
        formats read them; llama.cpp's ``special=False`` would drop control tokens silently."""
        n = self._to_piece(self._vocab, token, self._piece, 256, 0, special)
        if n < 0:
            big = ctypes.create_string_buffer(-n)
            n = self._to_piece(self._vocab, token, big, -n, 0, special)
            return big[:n]
        return self._piece[:n]

    def detokenize(self, tokens: Iterable[int]) -> str:
        return b"".join(self.token_bytes(t) for t in tokens).decode("utf-8", "replace")

    def _token_text(self, token: int) -> str:
        lc = native.llama()
        if token < 0:
            return ""
        return (lc.llama_vocab_get_text(self._vocab, token) or b"").decode("utf-8", "replace")

    # ---- chat --------------------------------------------------------------------------------

    @property
    def chat_template(self) -> str:
        """The model's own template (tokenizer.chat_template), or ChatML when it has none."""
        if self._template is None:
            raw = native.llama().llama_model_chat_template(self.model, None)
            self._template = raw.decode("utf-8", "replace") if raw else CHATML_TEMPLATE
        return self._template

    @property
    def has_own_template(self) -> bool:
        return self.chat_template != CHATML_TEMPLATE

    @property
    def special_tokens(self) -> tuple[str, ...]:
        """The text of every control and user-defined token of the vocabulary (read once)."""
        if self._specials is None:
            lc = native.llama()
            wanted = lc.LLAMA_TOKEN_ATTR_CONTROL | lc.LLAMA_TOKEN_ATTR_USER_DEFINED
            n = lc.llama_vocab_n_tokens(self._vocab)
            get_attr, text = lc.llama_vocab_get_attr, self._token_text
            self._specials = tuple(text(t) for t in range(n) if get_attr(self._vocab, t) & wanted)
        return self._specials

    @property
    def chat_format(self) -> ChatFormat:
        """How this model lays out reasoning and tool calls (moelocal.formats.detect_format)."""
        if self._format is None:
            # the vocabulary decides only where the model has no template of its own (detect_format), and
            # reading it costs a call per token (0.4 s for 152k tokens): only then
            specials = () if self.has_own_template else self.special_tokens
            self._format = detect_format(self.chat_template, specials)
        return self._format

    def render_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                    tools: Sequence[Mapping[str, Any]] | None = None, **template_args: Any) -> str:
        """The conversation through the model's template (moelocal.formats.render_chat); adaptations
        it needed are added to ``template_notes``. ``template_args``: enable_thinking, reasoning_effort ..."""
        lc = native.llama()
        text, notes = _render_chat(
            self.chat_format, self.chat_template, messages, tools=tools, add_generation_prompt=add_generation_prompt,
            bos_token=self._token_text(lc.llama_vocab_bos(self._vocab)),
            eos_token=self._token_text(lc.llama_vocab_eos(self._vocab)), **template_args,
        )
        self.template_notes.extend(n for n in notes if n not in self.template_notes)
        return text

    def new_notes(self) -> list[str]:
        """Template notes not returned before: each is shown to people once."""
        out = self.template_notes[self._notes_shown:]
        self._notes_shown = len(self.template_notes)
        return out

    def chat_tokens(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None = None,
                    **template_args: Any) -> list[int]:
        """The conversation rendered by the template and tokenized, with one BOS at most."""
        text = self.render_chat(messages, tools=tools, **template_args)
        return self.prompt_tokens(text)

    def prompt_tokens(self, text: str) -> list[int]:
        """A rendered prompt's tokens (special tokens parsed), with one BOS at most."""
        tokens = self.tokenize(text, add_special=True, parse_special=True)
        bos = native.llama().llama_vocab_bos(self._vocab)
        if len(tokens) >= 2 and tokens[0] == bos and tokens[1] == bos:
            tokens = tokens[1:]  # the template wrote the BOS and the tokenizer added another
        return tokens

    def chat(self, messages: Sequence[Mapping[str, Any]], params: SamplingParams = SamplingParams()) -> Iterator[Chunk]:
        return self.generate(self.chat_tokens(messages), params)

    # ---- one sequence ------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget the KV cache (the next prompt is processed from scratch)."""
        native.llama().llama_memory_clear(self._mem, False)  # the cells, not the bytes: no need to zero them
        self._cached = []
        self._checkpoint = None

    def generate(self, prompt: str | Sequence[int], params: SamplingParams = SamplingParams()) -> Iterator[Chunk]:
        """Stream one completion in sequence 0, reusing the KV cache for a prompt that starts like
        the previous one (a chat's earlier turns are not processed again)."""
        params = self.sampling(params)
        if params.grammar:
            self.check_grammar(params.grammar)
        tokens = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        if not tokens:
            raise UsageError("the prompt is empty")
        if len(tokens) >= self.n_ctx_seq:
            raise UsageError(f"the prompt has {len(tokens)} tokens; the context holds {self.n_ctx_seq}",
                             "use a larger --ctx or a shorter prompt")
        return self._generate(tokens, params)

    def _generate(self, tokens: list[int], params: SamplingParams) -> Iterator[Chunk]:
        lc = native.llama()
        seed = _seed(params)
        sampler = self._make_sampler(params, seed, tokens)
        try:
            reuse = self._reuse(tokens)
            t0 = time.perf_counter()
            new = tokens[reuse:]
            self._cached = None  # unknown until the decode below has finished
            with self._interruptible():
                for i in range(0, len(new), self.n_batch):
                    part = new[i : i + self.n_batch]
                    arr = (lc.llama_token * len(part))(*part)
                    self._check(self._decode(self.ctx, self._batch_one(arr, len(part))))
            cached = list(tokens)  # what sequence 0 holds now
            self._cached = cached
            if self._recurrent and new:
                self._save_checkpoint(cached)
            stream = _Stream(self, params)
            n_prompt = len(tokens)
            one = (lc.llama_token * 1)()
            batch = self._batch_one(one, 1)
            ctx, decode, sample, room, clock = self.ctx, self._decode, self._sample, self.n_ctx_seq, time.perf_counter
            token = sample(sampler, ctx, -1)
            t1 = clock()
            t_prompt = t1 - t0
            while True:  # per token: kept lean, it runs between two llama_decode calls
                text = stream.feed(token)
                if stream.finish is None and len(cached) >= room:
                    stream.finish = "length"  # no room left to decode this token
                    text += stream.flush()
                yield Chunk(text, 0, n_prompt, reuse, stream.n, t_prompt, clock() - t1, stream.finish, seed)
                if stream.finish is not None:
                    return
                one[0] = token
                self._cached = None  # until llama_decode has returned
                rc = decode(ctx, batch)
                if rc:
                    self._check(rc)
                cached.append(token)
                self._cached = cached
                token = sample(sampler, ctx, -1)
        finally:
            lc.llama_sampler_free(sampler)

    def _reuse(self, tokens: list[int]) -> int:
        """How many leading tokens of ``tokens`` are already in the cache (the rest is removed)."""
        lc = native.llama()
        cached = self._cached
        n = 0
        if cached:
            limit = min(len(cached), len(tokens) - 1)  # at least one token must be decoded for logits
            while n < limit and cached[n] == tokens[n]:
                n += 1
        if cached == []:
            return 0  # already empty
        if cached is None or n == 0 or not lc.llama_memory_seq_rm(self._mem, 0, n, -1):
            n = self._restore_checkpoint(cached, n) if cached else 0
            if n == 0:
                lc.llama_memory_clear(self._mem, False)
        self._cached = tokens[:n]
        return n

    # A recurrent layer keeps one state, not one entry per token, so llama.cpp cannot remove the end
    # of a sequence: a chat whose next prompt differs from the cache anywhere after the last prompt
    # (a re-tokenized answer, a template that rewrites earlier turns) would be processed again from
    # the first token, every turn. As llama-server does, the engine keeps a checkpoint: the
    # recurrent part of sequence 0's state at the end of the last prompt (the attention layers'
    # KV cache can be cut anywhere).
    _PARTIAL = 1  # LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY: only the recurrent (and SWA) state

    def _save_checkpoint(self, tokens: list[int]) -> None:
        lc = native.llama()
        self._checkpoint = None  # the old one goes first: the state can be tens of MB
        size = lc.llama_state_seq_get_size_ext(self.ctx, 0, self._PARTIAL)
        data = bytearray(size)
        if size and lc.llama_state_seq_get_data_ext(self.ctx, (ctypes.c_uint8 * size).from_buffer(data), size, 0,
                                                     self._PARTIAL) == size:
            self._checkpoint = (list(tokens), data)

    def _restore_checkpoint(self, cached: list[int], common: int) -> int:
        """Roll sequence 0 back to the checkpoint if the new prompt still starts with it; returns
        the number of tokens kept (0: nothing could be kept)."""
        ckpt = self._checkpoint
        if ckpt is None or not 0 < len(ckpt[0]) <= common or cached[: len(ckpt[0])] != ckpt[0]:
            return 0
        lc = native.llama()
        data = ckpt[1]
        if lc.llama_state_seq_set_data_ext(self.ctx, (ctypes.c_uint8 * len(data)).from_buffer(data), len(data), 0,
                                           self._PARTIAL) != len(data):
            return 0
        n = len(ckpt[0])
        if not lc.llama_memory_seq_rm(self._mem, 0, n, -1):
            return 0
        return n

    @contextlib.contextmanager
    def _interruptible(self) -> Iterator[None]:
        """Let Ctrl-C stop a long prompt in the middle of llama_decode, not after it.

        Python runs its SIGINT handler only between bytecodes, so a KeyboardInterrupt waits until
        llama_decode returns: a 2,048-token chunk on a CPU can take a minute. For the prompt
        (not per generated token: the callback runs once per graph node) a handler that only sets
        a flag is installed, and llama.cpp's abort callback, which its CPU backend calls between
        nodes on this thread, returns it: llama_decode stops and returns 2, and _check raises
        KeyboardInterrupt. Main thread only (signal handlers can only be set there)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        lc = native.llama()
        self._interrupted = False

        def on_sigint(_signum: int, _frame: object) -> None:
            self._interrupted = True

        abort = lc.ggml_abort_callback(lambda _data: self._interrupted)  # alive until the finally below
        previous = signal.signal(signal.SIGINT, on_sigint)
        lc.llama_set_abort_callback(self.ctx, abort, None)
        try:
            yield
        finally:
            lc.llama_set_abort_callback(self.ctx, ctypes.cast(None, lc.ggml_abort_callback), None)
            signal.signal(signal.SIGINT, previous)
        if self._interrupted:  # came between two llama_decode calls, or after the last
            self._cached = None
            raise KeyboardInterrupt

    def _check(self, rc: int) -> None:
        if rc == 2 and self._interrupted:  # aborted by Ctrl-C (_interruptible); some ubatches are in
            self._cached = None
            raise KeyboardInterrupt
        if rc != 0:
            self._cached = None
            why = native.last_error() or f"llama_decode returned {rc}"
            if rc == 1:
                raise UsageError("the context is full", "use a larger --ctx")
            raise EngineError(f"llama.cpp failed while generating: {why}")

    # ---- many sequences ----------------------------------------------------------------------

    def generate_many(self, requests: Iterable[Request | None], parallel: int | None = None) -> Iterator[Chunk]:
        """Run requests in llama.cpp's parallel sequences (up to ``parallel``, at most ``n_seq_max``, at
        a time), sharing each llama_decode call.

        A request is ``(prompt, params)`` or ``(prompt, params, cancelled)``, where ``cancelled()``
        returning True ends that request alone (finish_reason "cancelled"). ``requests`` is read
        lazily, whenever a sequence is free; it may yield None for "nothing new now" and is asked
        again after the next step (when nothing is running it is asked again at once, so a source
        with nothing to give should block or end). Chunks carry the request's number, counting from
        0 in the order given, as ``index``; a request that cannot run yields one chunk with
        finish_reason "error" (its text says why) and the rest go on.
        """
        lc = native.llama()
        lc.llama_memory_clear(self._mem, False)
        self._cached = None
        source = iter(requests)
        count = 0
        width = min(parallel or self.n_seq_max, self.n_seq_max)
        free = list(range(width - 1, -1, -1))
        slots: list[_Slot] = []
        batch = lc.llama_batch_init(self.n_batch, 0, 1)
        exhausted = False
        try:
            while True:
                while free and not exhausted:  # fill idle sequences
                    try:
                        item = next(source)
                    except StopIteration:
                        exhausted = True
                        break
                    if item is None:
                        break  # nothing new for now
                    index, count = count, count + 1
                    slot_or_error = self._start(index, item, free[-1])
                    if isinstance(slot_or_error, Chunk):
                        yield slot_or_error
                        continue
                    free.pop()
                    slots.append(slot_or_error)
                for s in [s for s in slots if s.cancelled is not None and s.cancelled()]:
                    yield Chunk(s.stream.flush(), s.index, len(s.prompt), 0, s.stream.n, s.t_prompt,
                                time.perf_counter() - s.t0 - s.t_prompt, "cancelled", s.seed)
                    self._finish(s, slots, free)
                if not slots:
                    if exhausted:
                        return
                    continue
                # A prompt goes through alone, chunk by chunk. Mixed with other sequences' single tokens,
                # llama.cpp would split the batch into many small ones (one KV stream per sequence), and
                # each answer would depend on which requests happened to run beside it.
                ready: list[_Slot]
                s0 = next((s for s in slots if s.pending is None), None)
                if s0 is not None:
                    take = min(len(s0.prompt) - s0.fed, self.n_batch)
                    for k in range(take):
                        _put(batch, k, s0.prompt[s0.fed + k], s0.fed + k, s0.seq, s0.fed + k == len(s0.prompt) - 1)
                    batch.n_tokens = take
                    s0.fed += take
                    s0.pos = s0.fed
                    s0.logit_row = take - 1
                    ready = [s0] if s0.fed == len(s0.prompt) else []
                else:
                    for n, s in enumerate(slots):  # one token for every sequence, in one batch
                        _put(batch, n, s.pending, s.pos, s.seq, True)
                        s.logit_row = n
                    batch.n_tokens = len(slots)
                    ready = slots
                rc = self._decode(self.ctx, batch)
                if rc != 0:
                    why = native.last_error() or f"llama_decode returned {rc}"
                    raise EngineError(f"llama.cpp failed while generating: {why}",
                                      "try fewer parallel sequences or a larger --ctx")
                now = time.perf_counter()
                done: list[_Slot] = []
                for s in ready:
                    if s.pending is None:
                        s.t_prompt = now - s.t0
                    else:
                        s.pos += 1
                    token = self._sample(s.sampler, self.ctx, s.logit_row)
                    text = s.stream.feed(token)
                    if s.stream.finish is None and s.pos >= self.n_ctx_seq:
                        s.stream.finish = "length"
                        text += s.stream.flush()
                    s.pending = token
                    yield Chunk(text, s.index, len(s.prompt), 0, s.stream.n, s.t_prompt,
                                time.perf_counter() - s.t0 - s.t_prompt, s.stream.finish, s.seed)
                    if s.stream.finish is not None:
                        done.append(s)
                for s in done:
                    self._finish(s, slots, free)
        finally:
            for s in slots:
                lc.llama_sampler_free(s.sampler)
            lc.llama_batch_free(batch)
            lc.llama_memory_clear(self._mem, False)
            self._cached = []

    def _finish(self, s: _Slot, slots: list[_Slot], free: list[int]) -> None:
        lc = native.llama()
        slots.remove(s)
        lc.llama_memory_seq_rm(self._mem, s.seq, -1, -1)
        lc.llama_sampler_free(s.sampler)
        free.append(s.seq)

    def _start(self, index: int, request: Request, seq: int) -> _Slot | Chunk:
        prompt, params = request[0], request[1]
        cancelled = request[2] if len(request) > 2 else None  # type: ignore[misc]
        try:
            params = self.sampling(params)
            tokens = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
            if not tokens:
                raise UsageError("the prompt is empty")
            if len(tokens) >= self.n_ctx_seq:
                raise UsageError(
                    f"the prompt has {len(tokens)} tokens; the context holds {self.n_ctx_seq} per sequence"
                )
            seed = _seed(params)
            sampler = self._make_sampler(params, seed, tokens)
        except UsageError as exc:
            return Chunk(str(exc), index, finish_reason="error")
        return _Slot(index=index, seq=seq, prompt=tokens, params=params, sampler=sampler,
                     stream=_Stream(self, params), seed=seed, cancelled=cancelled)

    def _make_sampler(self, params: SamplingParams, seed: int, prompt: Sequence[int]):
        if params.penalty_last_n == -1:  # llama.cpp's "the whole context"
            params = replace(params, penalty_last_n=self.n_ctx_seq)
        last_n = params.penalty_last_n or 0
        return _make_sampler(params, seed, vocab=self._vocab, n_vocab=self.n_vocab,
                             history=prompt[-last_n:] if last_n else ())


def _put(batch, i: int, token: int, pos: int, seq: int, logits: bool) -> None:
    batch.token[i] = token
    batch.pos[i] = pos
    batch.n_seq_id[i] = 1
    batch.seq_id[i][0] = seq
    batch.logits[i] = logits


def _seed(params: SamplingParams) -> int:
    return params.seed if params.seed is not None else random.SystemRandom().randrange(0, 2**32 - 1)


def _make_sampler(params: SamplingParams, seed: int, *, vocab=None, n_vocab: int = 0, history: Sequence[int] = ()):
    """llama.cpp's sampler chain: grammar (if any) → penalties (if any) → greedy, or top-k → top-p →
    min-p → temperature → draw(seed). ``params`` must be resolved (SamplingParams.resolved).

    ``history`` (the prompt's last tokens) goes into the penalties first, as llama-cli and
    llama-server do: a repeat penalty also keeps the answer from echoing the question.
    """
    lc = native.llama()
    chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
    if params.grammar:
        grammar = lc.llama_sampler_init_grammar(vocab, params.grammar.encode(), b"root")
        if not grammar:
            lc.llama_sampler_free(chain)
            raise UsageError(f"llama.cpp cannot parse the grammar: {native.last_error() or 'see its log'}")
        lc.llama_sampler_chain_add(chain, grammar)
    repeat = params.repeat_penalty if params.repeat_penalty is not None else 1.0
    last_n = params.penalty_last_n if params.penalty_last_n is not None else 64
    if last_n and (repeat != 1.0 or params.presence_penalty or params.frequency_penalty):
        penalties = lc.llama_sampler_init_penalties(n_vocab, last_n, repeat, params.frequency_penalty,
                                                    params.presence_penalty)
        for token in history:
            lc.llama_sampler_accept(penalties, token)
        lc.llama_sampler_chain_add(chain, penalties)
    temperature = params.temperature if params.temperature is not None else 0.8
    if temperature <= 0:
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_greedy())
        return chain
    if params.top_k:
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_k(params.top_k))
    if params.top_p is not None and params.top_p < 1.0:
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_p(params.top_p, 1))
    if params.min_p:
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_min_p(params.min_p, 1))
    lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_temp(temperature))
    lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_dist(seed))
    return chain


def _check_options(plan: Plan) -> None:
    o = plan.options
    if o.kv_type not in native.GGML_TYPES:
        raise UsageError(f"unknown KV cache type {o.kv_type!r}", "use f16, q8_0 or q4_0")
    if o.n_ctx <= 0 or o.n_ubatch <= 0 or o.n_seq <= 0:
        raise UsageError("context, ubatch and sequences must be positive")
    if o.kv_type not in ("f16", "f32", "bf16") and not o.flash_attn:
        # llama.cpp refuses a quantized V cache without flash attention
        raise UsageError(f"a {o.kv_type} KV cache needs flash attention", "add --flash-attn or use --kv-type f16")


_BACKEND_READY = False
# Workers this process holds a connection to (through a loaded engine). A worker serves one client
# at a time, so probing one of these would wait for ourselves: they are not probed again.
_LIVE_WORKERS: Counter[str] = Counter()


def _connect_workers(workers: Sequence[str]) -> tuple[dict[str, int], dict[str, str], tuple[str, ...]]:
    """Connect llama.cpp to the workers, checked first (llama.cpp aborts the process on a worker it
    cannot reach). Returns plan device name → ggml device, buffer type name → plan device, and the
    workers' endpoints as llama.cpp knows them."""
    if not workers:
        return {}, {}, ()
    named: dict[str, int] = {}
    bufts: dict[str, str] = {}
    endpoints = [rpc.normalize_endpoint(w) for w in workers]
    if len(set(endpoints)) != len(endpoints):
        raise UsageError("the same worker is given twice", "give each --worker once")
    for ep in endpoints:
        expected = None if _LIVE_WORKERS[ep] > 0 else len(rpc.probe(ep).devices)
        handles = native.rpc_add_server(ep)
        if expected is not None and len(handles) != expected:
            raise EngineError(f"the worker at {ep} serves {expected} device(s) now, {len(handles)} when this "
                              "process first connected to it", "start the program again")
        for i, h in enumerate(handles):
            name = f"rpc{len(named)}"
            named[name] = h
            bufts[native.rpc_buffer_type_name(ep, i)] = name
    rpc.guard_aborts(endpoints)
    return named, bufts, tuple(endpoints)


def _backend_init() -> None:
    global _BACKEND_READY
    if not _BACKEND_READY:
        native.llama().llama_backend_init()
        _BACKEND_READY = True


__all__ = [
    "CHATML_TEMPLATE",
    "extra_bufts_default",
    "Chunk",
    "Deviation",
    "Engine",
    "SAMPLING_DEFAULTS",
    "SamplingParams",
    "recommended_sampling",
    "compare_memory",
    "default_threads",
    "fit_messages",
    "measured_memory",
    "render_template",
]
