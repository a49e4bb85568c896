"""`moelocal chat`: talk to a model in the terminal, its experts placed as `fit` planned."""

from __future__ import annotations

import json
import math
import shutil
import sys
import unicodedata
from pathlib import Path

import typer

from moelocal import _output
from moelocal.commands._common import ModelArg
from moelocal.commands._run import (
    CpuMoeOpt,
    CtxOpt,
    FlashAttnOpt,
    ForceOpt,
    FrequencyPenaltyOpt,
    IgnoreEosOpt,
    KvTypeOpt,
    MaxTokensOpt,
    MinPOpt,
    NCpuMoeOpt,
    NetBwOpt,
    NglOpt,
    PlacementFlags,
    PlanOpt,
    PresencePenaltyOpt,
    ReasoningEffortOpt,
    RepeatPenaltyOpt,
    SeedOpt,
    SystemOpt,
    TempOpt,
    ThinkOpt,
    ThreadsOpt,
    TopKOpt,
    TopPOpt,
    WorkerMemOpt,
    WorkerOpt,
    for_terminal,
    note,
    open_engine,
    sampling,
    sampling_line,
    show_template_notes,
    status_line,
    template_args,
    warn,
)

HELP = """Commands:
  /help          this list
  /reset         start a new conversation (the system message stays)
  /system TEXT   set the system message (/system alone shows it)
  /stats         speed, tokens and where the model's tensors live
  /think show    show the model's thinking as it comes (dimmed, folded to one line at the end)
  /think hide    show only how long it thought
  /think on|off  let the model think, or not (models whose template has a switch: Qwen3, DeepSeek, GLM)
  /save FILE     write the conversation to FILE as JSON
  /exit          leave (Ctrl-D does too)
Ctrl-C stops an answer; the conversation goes on."""


def chat(
    model: ModelArg = None,
    system: SystemOpt = None,
    temp: TempOpt = None,
    top_p: TopPOpt = None,
    top_k: TopKOpt = None,
    min_p: MinPOpt = None,
    repeat_penalty: RepeatPenaltyOpt = None,
    presence_penalty: PresencePenaltyOpt = 0.0,
    frequency_penalty: FrequencyPenaltyOpt = 0.0,
    seed: SeedOpt = None,
    max_tokens: MaxTokensOpt = 1024,
    ctx: CtxOpt = None,
    threads: ThreadsOpt = None,
    plan: PlanOpt = "auto",
    cpu_moe: CpuMoeOpt = False,
    n_cpu_moe: NCpuMoeOpt = None,
    ngl: NglOpt = None,
    force: ForceOpt = False,
    kv_type: KvTypeOpt = "f16",
    flash_attn: FlashAttnOpt = True,
    worker: WorkerOpt = None,
    worker_mem: WorkerMemOpt = None,
    net_bw: NetBwOpt = None,
    ignore_eos: IgnoreEosOpt = False,
    think: ThinkOpt = None,
    reasoning_effort: ReasoningEffortOpt = None,
) -> None:
    """Chat with a model in the terminal: answers stream as they are generated.

    Uses the model's own chat template and keeps the conversation; when it nears the context limit
    the oldest turns are dropped (and you are told). Type /help for the slash commands. Ctrl-C stops
    the current answer, Ctrl-D leaves. After each answer a status line shows the speed and where the
    experts live. A model's thinking (Qwen3, gpt-oss, DeepSeek ...) is shown dimmed as it comes and
    folded to one line when the answer starts; /think hide shows only that line.

    Examples:

      moelocal chat

      moelocal chat Qwen3-30B-A3B-Q4_K_M.gguf --system "Answer in one sentence." --temp 0.7

      moelocal chat model.gguf --n-cpu-moe 20 --ctx 16384

      moelocal chat gpt-oss-20b-mxfp4.gguf --reasoning-effort high
    """
    params = sampling(temp=temp, top_p=top_p, seed=seed, max_tokens=max_tokens, ignore_eos=ignore_eos,
                     top_k=top_k, min_p=min_p, repeat_penalty=repeat_penalty,
                     presence_penalty=presence_penalty, frequency_penalty=frequency_penalty)
    flags = PlacementFlags(plan=plan, cpu_moe=cpu_moe, n_cpu_moe=n_cpu_moe, ngl=ngl, force=force, kv_type=kv_type,
                           flash_attn=flash_attn,
                           workers=tuple(worker or ()), worker_mem=tuple(worker_mem or ()), net_bw=net_bw)
    engine, summary = open_engine(model, flags, ctx=ctx, threads=threads)
    with engine:
        session = Session(engine, summary, params, system)
        fmt = engine.chat_format
        session.enable_thinking = think if fmt.thinking_toggle else None
        session.reasoning_effort = reasoning_effort
        template_args(fmt, enable_thinking=think, reasoning_effort=reasoning_effort)  # said once, if ignored
        session.run()


class Session:
    """One conversation: the messages, the running totals, and the loop that reads the terminal."""

    def __init__(self, engine, summary, params, system: str | None) -> None:
        self.engine = engine
        self.summary = summary
        self.params = params
        self.system = system
        self.messages: list[dict[str, str]] = []
        self.turns = 0
        self.prompt_tokens = 0  # processed, not counting what the cache reused
        self.completion_tokens = 0
        self.generation_seconds = 0.0
        self.last = None
        self.tty = sys.stdin.isatty()
        self.show_thinking = True
        self.enable_thinking: bool | None = None  # None: the template's default
        self.reasoning_effort: str | None = None

    def run(self) -> None:
        if self.tty:
            try:
                import readline  # noqa: F401  line editing and history for input()
            except ImportError:
                pass
        where = self.engine.expert_location(self.summary.n_layer) if self.summary.is_moe else "dense model"
        note(f"Chatting with {self.summary.name} (experts in {where}, context {self.engine.n_ctx_seq}). "
                     "/help for commands, Ctrl-C stops an answer, Ctrl-D leaves.")
        while True:
            try:
                line = input("> " if self.tty else "")
            except EOFError:
                if self.tty:
                    sys.stdout.write("\n")
                return
            except KeyboardInterrupt:
                sys.stdout.write("\n")
                note("(Ctrl-D or /exit to leave)")
                continue
            text = line.strip()
            if not text:
                continue
            if text.startswith("/"):
                if not self.command(text):
                    return
                continue
            self.turn(text)

    # ---- one exchange ------------------------------------------------------------------------

    def conversation(self) -> list[dict[str, str]]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.messages

    def template_args(self) -> dict[str, object]:
        return template_args(self.engine.chat_format, enable_thinking=self.enable_thinking,
                             reasoning_effort=self.reasoning_effort, say=False)

    def turn(self, text: str) -> None:
        from moelocal.engine import fit_messages

        e = self.engine
        targs = self.template_args()
        self.messages.append({"role": "user", "content": text})
        reserve = min(self.params.max_tokens, e.n_ctx_seq // 2)
        limit = e.n_ctx_seq - reserve
        msgs, dropped = fit_messages(self.conversation(), lambda m: len(e.chat_tokens(m, **targs)), limit)
        if dropped:
            self.messages = self.messages[dropped:]
            note(f"(dropped the {dropped} oldest messages to stay within the {e.n_ctx_seq}-token context)")
        prompt = e.render_chat(msgs, **targs)
        show_template_notes(e)
        tokens = e.prompt_tokens(prompt)
        if len(tokens) >= e.n_ctx_seq:
            self.messages.pop()
            warn(f"that message takes {len(tokens)} tokens and the context holds {e.n_ctx_seq}; "
                         "send a shorter one or start again with a larger --ctx")
            return
        parser = e.chat_format.parser(prompt)
        out = _Answer(sys.stdout, self.show_thinking)
        last = None
        stream = e.generate(tokens, self.params)
        try:
            for chunk in stream:
                last = chunk
                out.show(parser.feed(chunk.text) + (parser.flush() if chunk.done else []), chunk)
        except KeyboardInterrupt:
            stream.close()
            out.show(parser.flush(), last)
            out.close(last)
            note("[stopped]")
        else:
            out.close(last)
        # What the template expects of an earlier turn: the answer, with its reasoning apart. Templates
        # that drop old reasoning then render this turn the same way every time after, so the KV cache's
        # prefix stays valid from the next turn on.
        self.messages.append(parser.finish().to_openai())
        if last is not None:
            self.turns += 1
            self.last = last
            self.prompt_tokens += last.prompt_tokens - last.cached_tokens
            self.completion_tokens += last.completion_tokens
            self.generation_seconds += last.generation_seconds
            used = last.prompt_tokens + last.completion_tokens
            note(status_line(e, self.summary, last, context_used=used))

    # ---- slash commands ----------------------------------------------------------------------

    def command(self, text: str) -> bool:
        """Run a slash command; False means leave."""
        name, _, arg = text.partition(" ")
        arg = arg.strip()
        if name in ("/exit", "/quit", "/bye"):
            return False
        if name in ("/help", "/?"):
            _output.err.print(HELP, markup=False)
        elif name == "/reset":
            self.messages = []
            note("Conversation cleared.")
        elif name == "/system":
            if arg:
                self.system = arg
                note("System message set; it applies from the next answer.")
            else:
                note(f"System message: {self.system!r}" if self.system else "No system message.")
        elif name == "/stats":
            self.stats()
        elif name == "/think":
            self.think(arg)
        elif name == "/save":
            self.save(arg)
        else:
            warn(f"unknown command {name}; /help lists them")
        return True

    def think(self, arg: str) -> None:
        fmt = self.engine.chat_format
        if arg in ("show", "hide"):
            self.show_thinking = arg == "show"
            note("Thinking is shown as it comes." if self.show_thinking else "Thinking is hidden (its length shows).")
        elif arg in ("on", "off"):
            if not fmt.thinking_toggle:
                warn("this model's chat template has no switch for thinking (enable_thinking)")
                return
            self.enable_thinking = arg == "on"
            note(f"Thinking {'on' if self.enable_thinking else 'off'} from the next answer.")
        elif arg:
            warn(f"unknown /think {arg}; use /think show, hide, on or off")
        else:
            note(self.thinking_state())

    def thinking_state(self) -> str:
        fmt = self.engine.chat_format
        if fmt.reasoning is None:
            return f"This model's format ({fmt.name}) has no thinking of its own."
        switch = {None: "the template's default", True: "on", False: "off"}[self.enable_thinking]
        parts = [f"format: {fmt.name}", f"thinking {'shown' if self.show_thinking else 'hidden'}"]
        if fmt.thinking_toggle:
            parts.append(f"thinking switch: {switch}")
        if fmt.effort:
            parts.append(f"reasoning effort: {self.reasoning_effort or 'the template default'}")
        return "; ".join(parts)

    def stats(self) -> None:
        e, s = self.engine, self.summary
        hb = _output.human_bytes
        lines = [f"model: {s.name} ({s.architecture}, {s.quantization}), {e.path}"]
        lines.append(f"placement: {e.plan.placement.describe(s.n_layer)}"
                     + (f"; experts in {e.expert_location(s.n_layer)}" if s.is_moe else ""))
        mem = ", ".join(f"{'RAM' if d == 'cpu' else d.upper()} {hb(m.total)} (weights {hb(m.weights)}, "
                        f"KV {hb(m.kv)}, compute {hb(m.compute)})" for d, m in e.memory.items())
        lines.append(f"memory: {mem}")
        lines.append(f"threads: {e.n_threads}, context: {e.n_ctx_seq} tokens")
        lines.append(self.thinking_state())
        lines.append("sampling: " + sampling_line(e, self.params))
        speed = (self.completion_tokens - self.turns) / self.generation_seconds if self.generation_seconds else 0.0
        lines.append(f"turns: {self.turns}, prompt tokens processed: {self.prompt_tokens}, "
                     f"tokens generated: {self.completion_tokens}, average {speed:.1f} tok/s")
        if self.last is not None:
            lines.append("last answer: " + status_line(e, s, self.last))
        _output.err.print("\n".join(lines), markup=False, highlight=False)

    def save(self, arg: str) -> None:
        if not arg:
            warn("/save needs a file name: /save chat.json")
            return
        path = Path(arg).expanduser()
        data = {"model": self.summary.name, "system": self.system, "messages": self.messages}
        try:
            path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        except OSError as exc:
            warn(f"could not write {path}: {exc.strerror or exc}")
            return
        note(f"Saved {len(self.messages)} messages to {path}.")


class _Answer:
    """Writes one answer to the terminal: the thinking dimmed as it comes (or a placeholder when it is
    hidden), replaced by one line ("thought for 3.1 s · 140 tokens") when the answer starts; then the
    answer. Without a terminal, the thinking is left out and its line goes to stderr."""

    DIM, RESET = "\x1b[2m", "\x1b[0m"

    def __init__(self, out, show: bool) -> None:
        self.out = out
        self.tty = out.isatty()
        self.show_text = show
        self.thinking = False  # between the first reasoning delta and the end of reasoning
        self.written = ""  # what is on the screen of the thinking, to count its rows

    def show(self, deltas, chunk) -> None:
        for d in deltas:
            if d.kind == "reasoning":
                self._think(d.text, chunk)
                continue
            self._fold(chunk)
            text = d.text if d.kind == "content" else f"[tool call {d.call.name} {d.call.arguments}]\n"
            self.out.write(for_terminal(text) if self.tty else text)
        self.out.flush()

    def close(self, chunk) -> None:
        self._fold(chunk, ended=True)
        self.out.write("\n")
        self.out.flush()

    def _think(self, text: str, chunk) -> None:
        if not self.thinking:
            self.thinking = True
            if self.tty and not self.show_text:
                self._write_dim("thinking…")
        if self.tty and self.show_text:
            self._write_dim(for_terminal(text))

    def _write_dim(self, text: str) -> None:
        self.written += text
        self.out.write(self.DIM + text + self.RESET)

    def _fold(self, chunk, ended: bool = False) -> None:
        if not self.thinking:
            return
        self.thinking = False
        # every format thinks first: the thinking is the answer's tokens before the one that ended it
        n = (chunk.completion_tokens - (0 if ended else 1)) if chunk is not None else 0
        seconds = chunk.generation_seconds if chunk is not None else 0.0
        line = f"thought for {seconds:.1f} s · {max(n, 0)} tokens"
        if not self.tty:
            note(line)
            return
        rows = _rows(self.written, shutil.get_terminal_size().columns)
        if rows < shutil.get_terminal_size().lines:  # all of it is still on the screen: replace it
            self.out.write("\r" + (f"\x1b[{rows - 1}A" if rows > 1 else "") + "\x1b[J")
        else:
            self.out.write("\n")
        self.out.write(self.DIM + line + self.RESET + ("\n" if not ended else ""))
        self.written = ""


def _rows(text: str, columns: int) -> int:
    """Terminal rows ``text`` takes when written from the start of a row (wide characters count twice)."""
    columns = max(columns, 1)
    total = 0
    for line in text.split("\n"):
        width = sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in line)
        total += max(1, math.ceil(width / columns))
    return total


def register(app: typer.Typer) -> None:
    app.command("chat")(chat)
