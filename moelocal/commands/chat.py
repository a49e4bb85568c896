"""`moelocal chat`: talk to a model in the terminal, its experts placed as `fit` planned."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from moelocal import _output
from moelocal.commands._common import ModelArg
from moelocal.commands._run import (
    CpuMoeOpt,
    CtxOpt,
    FlashAttnOpt,
    ForceOpt,
    IgnoreEosOpt,
    KvTypeOpt,
    MaxTokensOpt,
    NCpuMoeOpt,
    NetBwOpt,
    NglOpt,
    OverrideTensorOpt,
    PlacementFlags,
    PlanOpt,
    SeedOpt,
    SystemOpt,
    TempOpt,
    ThreadsOpt,
    TopPOpt,
    WorkerMemOpt,
    WorkerOpt,
    for_terminal,
    note,
    open_engine,
    sampling,
    speed_line,
    status_line,
    warn,
)

HELP = """Commands:
  /help          this list
  /reset         start a new conversation (the system message stays)
  /system TEXT   set the system message (/system alone shows it)
  /stats         speed, tokens and where the model's tensors live
  /save FILE     write the conversation to FILE as JSON
  /exit          leave (Ctrl-D does too)
Ctrl-C stops an answer; the conversation goes on."""


def chat(
    model: ModelArg = None,
    system: SystemOpt = None,
    temp: TempOpt = 0.8,
    top_p: TopPOpt = 0.95,
    seed: SeedOpt = None,
    max_tokens: MaxTokensOpt = 1024,
    ctx: CtxOpt = None,
    threads: ThreadsOpt = None,
    plan: PlanOpt = "auto",
    cpu_moe: CpuMoeOpt = False,
    n_cpu_moe: NCpuMoeOpt = None,
    ngl: NglOpt = None,
    override_tensor: OverrideTensorOpt = None,
    force: ForceOpt = False,
    kv_type: KvTypeOpt = "f16",
    flash_attn: FlashAttnOpt = True,
    worker: WorkerOpt = None,
    worker_mem: WorkerMemOpt = None,
    net_bw: NetBwOpt = None,
    ignore_eos: IgnoreEosOpt = False,
) -> None:
    """Chat with a model in the terminal: answers stream as they are generated.

    Uses the model's own chat template and keeps the conversation; when it nears the context limit
    the oldest turns are dropped (and you are told). Type /help for the slash commands. Ctrl-C stops
    the current answer, Ctrl-D leaves. After each answer a status line shows the speed and where the
    experts live.

    Examples:

      moelocal chat

      moelocal chat Qwen3-30B-A3B-Q4_K_M.gguf --system "Answer in one sentence." --temp 0.7

      moelocal chat model.gguf --n-cpu-moe 20 --ctx 16384
    """
    params = sampling(temp=temp, top_p=top_p, seed=seed, max_tokens=max_tokens, ignore_eos=ignore_eos)
    flags = PlacementFlags(plan=plan, cpu_moe=cpu_moe, n_cpu_moe=n_cpu_moe, ngl=ngl, force=force, kv_type=kv_type,
                           flash_attn=flash_attn,
                           workers=tuple(worker or ()), worker_mem=tuple(worker_mem or ()), net_bw=net_bw,
                           overrides=tuple(override_tensor or ()))
    engine, summary = open_engine(model, flags, ctx=ctx, threads=threads)
    with engine:
        Session(engine, summary, params, system).run()


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

    def turn(self, text: str) -> None:
        from moelocal.engine import fit_messages

        e = self.engine
        self.messages.append({"role": "user", "content": text})
        reserve = min(self.params.max_tokens, e.n_ctx_seq // 2)
        limit = e.n_ctx_seq - reserve
        msgs, dropped = fit_messages(self.conversation(), lambda m: len(e.chat_tokens(m)), limit)
        if dropped:
            self.messages = self.messages[dropped:]
            note(f"(dropped the {dropped} oldest messages to stay within the {e.n_ctx_seq}-token context)")
        tokens = e.chat_tokens(msgs)
        if len(tokens) >= e.n_ctx_seq:
            self.messages.pop()
            warn(f"that message takes {len(tokens)} tokens and the context holds {e.n_ctx_seq}; "
                         "send a shorter one or start again with a larger --ctx")
            return
        pieces: list[str] = []
        last = None
        shown = for_terminal if sys.stdout.isatty() else str
        stream = e.generate(tokens, self.params)
        try:
            for chunk in stream:
                last = chunk
                if chunk.text:
                    pieces.append(chunk.text)
                    sys.stdout.write(shown(chunk.text))
                    sys.stdout.flush()
        except KeyboardInterrupt:
            stream.close()
            sys.stdout.write("\n")
            sys.stdout.flush()
            note("[stopped]")
        else:
            sys.stdout.write("\n")
            sys.stdout.flush()
        self.messages.append({"role": "assistant", "content": "".join(pieces)})
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
        elif name == "/save":
            self.save(arg)
        else:
            warn(f"unknown command {name}; /help lists them")
        return True

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
        speed = (self.completion_tokens - self.turns) / self.generation_seconds if self.generation_seconds else 0.0
        lines.append(f"turns: {self.turns}, prompt tokens processed: {self.prompt_tokens}, "
                     f"tokens generated: {self.completion_tokens}, average {speed:.1f} tok/s")
        lines.append(speed_line(e, speed))  # fit's prediction beside what this chat measured
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


def register(app: typer.Typer) -> None:
    app.command("chat")(chat)
