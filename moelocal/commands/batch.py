"""`moelocal batch`: many prompts from a JSONL file, answered in llama.cpp's parallel sequences."""

from __future__ import annotations

import json
import sys
import time
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Annotated, Any

import typer

from moelocal import _output
from moelocal.commands._run import (
    CpuMoeOpt,
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
    OverrideTensorOpt,
    PlacementFlags,
    PlanOpt,
    PresencePenaltyOpt,
    RepeatPenaltyOpt,
    SeedOpt,
    SystemOpt,
    TempOpt,
    ThreadsOpt,
    TopKOpt,
    TopPOpt,
    WorkerMemOpt,
    WorkerOpt,
    load_engine,
    note,
    resolve_model,
    sampling,
)
from moelocal.errors import EngineError, UsageError

# Per-line sampling keys and the SamplingParams field each sets.
LINE_PARAMS = {"max_tokens": "max_tokens", "temperature": "temperature", "temp": "temperature", "top_p": "top_p",
               "top_k": "top_k", "min_p": "min_p", "seed": "seed", "stop": "stop", "repeat_penalty": "repeat_penalty",
               "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty"}
# Context per sequence when --ctx is not given: batch prompts are short, and n sequences share the cache.
BATCH_CTX = 4096


@dataclass(frozen=True)
class Job:
    """One input line: a request to run, or why it cannot run."""

    line: int
    id: Any
    prompt: str | None = None
    messages: list | None = None
    params: Any = None
    error: str | None = None
    tools: list | None = None
    template_args: dict | None = None  # enable_thinking, reasoning_effort


def batch(
    model: Annotated[str, typer.Argument(help="A .gguf file (any shard of a split set), or a Hugging Face repo "
                                         "org/name[:QUANT].", show_default=False)],
    input: Annotated[Path | None, typer.Argument(help="JSONL input. Default: stdin.", show_default=False)] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="JSONL output, appended to; ids already "
                                                "in it are skipped, so a re-run resumes. Default: stdout.")] = None,
    parallel: Annotated[int | None, typer.Option("--parallel", "-np", help="Requests run at once, as llama.cpp "
                                                 "parallel sequences sharing each batch. Default: as many as "
                                                 "decode fastest in all (predicted; up to 16) while their KV "
                                                 "caches fit.", show_default=False)] = None,
    system: SystemOpt = None,
    max_tokens: MaxTokensOpt = 512,
    temp: TempOpt = None,
    top_p: TopPOpt = None,
    top_k: TopKOpt = None,
    min_p: MinPOpt = None,
    repeat_penalty: RepeatPenaltyOpt = None,
    presence_penalty: PresencePenaltyOpt = 0.0,
    frequency_penalty: FrequencyPenaltyOpt = 0.0,
    seed: SeedOpt = None,
    ctx: Annotated[int | None, typer.Option("--ctx", "-c", help=f"Context per request in tokens. Default: "
                                            f"{BATCH_CTX} (or the model's, if smaller).")] = None,
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
    """Answer every line of a JSONL file, several at a time.

    Each input line is {"id": ..., "prompt": "..."} (plain text completion) or {"id": ..., "messages":
    [{"role": "user", "content": "..."}]} (through the model's chat template, after --system if given),
    optionally with its own max_tokens, temperature, top_p, top_k, min_p, repeat_penalty, presence_penalty,
    frequency_penalty, seed, stop or response_format (OpenAI's: {"type": "json_object"} or {"type":
    "json_schema", "json_schema": {"schema": ...}} constrains the answer to JSON), and for messages "tools"
    (OpenAI's shape), "enable_thinking" or "reasoning_effort". Each output line is {"id", "content",
    "reasoning", "text", "prompt_tokens", "completion_tokens", "finish_reason", "seconds"}: the answer, the
    model's thinking apart from it, and the text as the model wrote it; with tools also "tool_calls" (id,
    function name and arguments as a JSON string; finish_reason "tool_calls"). Records are written whole and
    flushed as soon as that request ends (so in the order they finish). A bad line becomes
    {"id", "line", "error"} and the batch goes on. With -o, a re-run skips ids already in the file: an
    interrupted batch resumes. With --seed, every request gets its own seed derived from it and its id,
    so results do not depend on the order.

    Examples:

      moelocal batch model.gguf prompts.jsonl -o answers.jsonl --seed 1

      cat prompts.jsonl | moelocal batch model.gguf --max-tokens 64 > answers.jsonl
    """
    if parallel is not None and parallel < 1:
        raise UsageError(f"--parallel must be at least 1, got {parallel}")
    base = sampling(temp=temp, top_p=top_p, seed=seed, max_tokens=max_tokens, ignore_eos=ignore_eos,
                    top_k=top_k, min_p=min_p, repeat_penalty=repeat_penalty,
                    presence_penalty=presence_penalty, frequency_penalty=frequency_penalty)
    path, summary = resolve_model(model)  # a wrong MODEL fails before any output is written
    text = _read_input(input)
    done_ids, done_lines = _done(output) if output is not None else (set(), set())
    jobs = parse_jobs(text, base, seed)
    todo = [j for j in jobs if not _is_done(j, done_ids, done_lines)]
    skipped = len(jobs) - len(todo)
    if skipped:
        note(f"{skipped} of {len(jobs)} requests are already in {output}; resuming with {len(todo)}.")
    if not todo:
        return
    runnable = [j for j in todo if j.error is None]
    from moelocal import hardware  # imported late, like everything heavy

    hw = hardware.detect()
    if parallel is None:  # the most predicted tokens/s whose N sequences' KV cache still fits (explain.py)
        from moelocal.explain import choose_parallel
        from moelocal.plan import RunOptions

        per_seq = RunOptions(n_ctx=ctx or min(BATCH_CTX, summary.context_length or BATCH_CTX), kv_type=kv_type,
                             flash_attn=flash_attn, n_threads=threads)
        parallel = choose_parallel(summary, hw, per_seq, len(runnable), n_gpu_layers=ngl, n_cpu_moe=n_cpu_moe,
                                   cpu_moe=cpu_moe)
    n_seq = max(1, min(parallel, len(runnable)))
    flags = PlacementFlags(plan=plan, cpu_moe=cpu_moe, n_cpu_moe=n_cpu_moe, ngl=ngl, force=force, kv_type=kv_type,
                           flash_attn=flash_attn,
                           workers=tuple(worker or ()), worker_mem=tuple(worker_mem or ()), net_bw=net_bw,
                           overrides=tuple(override_tensor or ()))
    sink = _open_output(output)
    try:
        for j in todo:
            if j.error is not None:
                _write(sink, {"id": j.id, "line": j.line, "error": j.error, "finish_reason": "error"})
        if not runnable:
            return
        per_seq = ctx if ctx is not None else min(BATCH_CTX, summary.context_length or BATCH_CTX)
        engine = load_engine(path, summary, flags, ctx=per_seq, threads=threads, n_seq=n_seq, hw=hw)
        with engine:
            _run(engine, runnable, n_seq, system, sink)
    finally:
        if sink is not sys.stdout:
            sink.close()


def _run(engine, jobs: list[Job], n_seq: int, system: str | None, sink: IO[str]) -> None:
    from moelocal.formats import Parser

    texts: dict[int, list[str]] = {}
    parsers: dict[int, Any] = {}
    started = time.perf_counter()
    n_done = 0
    fmt = engine.chat_format

    def requests():
        for i, j in enumerate(jobs):
            if j.messages is not None:
                msgs = ([{"role": "system", "content": system}] if system else []) + j.messages
                try:
                    reads = {"enable_thinking": fmt.thinking_toggle, "reasoning_effort": fmt.effort}
                    targs = {k: v for k, v in (j.template_args or {}).items() if reads[k]}  # what the template reads
                    if j.params.grammar and fmt.thinking_toggle:
                        targs.setdefault("enable_thinking", False)  # the grammar leaves no room for thinking
                    text = engine.render_chat(msgs, tools=j.tools, **targs)
                    prompt: Any = engine.prompt_tokens(text)
                    # under a grammar (response_format) all the model writes is the constrained answer
                    parsers[i] = Parser(text) if j.params.grammar else fmt.parser(text, j.tools)
                except EngineError as exc:  # a template that rejects these messages fails this line only
                    prompt = ""
                    jobs[i] = replace(j, error=f"line {j.line}: {exc.message}")
            else:
                prompt = j.prompt
                parsers[i] = Parser(prompt)  # a plain completion: the text is the content
            yield prompt, j.params

    bar = _Bar(len(jobs))
    try:
        for chunk in engine.generate_many(requests(), parallel=n_seq):
            if chunk.text and chunk.finish_reason != "error":
                texts.setdefault(chunk.index, []).append(chunk.text)
            if chunk.done:
                j = jobs[chunk.index]
                if chunk.finish_reason == "error":
                    _write(sink, {"id": j.id, "line": j.line, "error": j.error or chunk.text, "finish_reason": "error"})
                else:
                    text = "".join(texts.pop(chunk.index, []))
                    parser = parsers.pop(chunk.index)
                    parser.feed(text)
                    msg = parser.finish()
                    rec: dict[str, Any] = {"id": j.id, "content": msg.content, "reasoning": msg.reasoning, "text": text}
                    finish = chunk.finish_reason
                    if j.tools is not None:
                        rec["tool_calls"] = [c.to_openai() for c in msg.tool_calls]
                        if msg.tool_calls and finish == "stop":
                            finish = "tool_calls"
                    rec.update(prompt_tokens=chunk.prompt_tokens, completion_tokens=chunk.completion_tokens,
                               finish_reason=finish, seconds=round(chunk.seconds, 3))
                    _write(sink, rec)
                n_done += 1
                bar.advance(n_done)
    finally:
        bar.close()
    elapsed = time.perf_counter() - started
    note(f"{n_done} requests in {elapsed:.1f} s, {n_seq} at a time.")


# ---- input and output ------------------------------------------------------------------------


def _read_input(path: Path | None) -> str:
    if path is None:
        if sys.stdin.isatty():
            raise UsageError("no input", "give a JSONL file, or pipe one on stdin")
        return sys.stdin.read()
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None


def parse_jobs(text: str, base, seed: int | None) -> list[Job]:
    """Every non-empty line as a Job; lines that cannot run carry their error. Ids must be unique."""
    jobs: list[Job] = []
    seen: set[str] = set()
    for n, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        jobs.append(_parse_line(n, raw, base, seed, seen))
    return jobs


def _parse_line(n: int, raw: str, base, seed: int | None, seen: set[str]) -> Job:
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as exc:
        return Job(n, None, error=f"line {n} is not JSON: {exc.msg}")
    if not isinstance(obj, dict):
        return Job(n, None, error=f"line {n} is not a JSON object")
    rid = obj.get("id")
    if rid is None or isinstance(rid, (dict, list, bool)):
        return Job(n, None, error=f"line {n} has no id (a string or a number)")
    key = _key(rid)
    if key in seen:
        return Job(n, rid, error=f"line {n} repeats id {rid!r}")
    seen.add(key)
    prompt, messages = obj.get("prompt"), obj.get("messages")
    if (prompt is None) == (messages is None):
        return Job(n, rid, error=f"line {n} needs either \"prompt\" or \"messages\"")
    if prompt is not None and (not isinstance(prompt, str) or not prompt):
        return Job(n, rid, error=f"line {n}: \"prompt\" must be a non-empty string")
    if messages is not None and not _valid_messages(messages):
        return Job(n, rid, error=f"line {n}: \"messages\" must be a list of {{\"role\", \"content\"}} objects")
    tools = obj.get("tools")
    if tools is not None and (messages is None or not isinstance(tools, list)
                              or not all(isinstance(t, dict) and isinstance((t.get("function") or {}).get("name"), str)
                                         for t in tools)):
        return Job(n, rid, error=f"line {n}: \"tools\" must be a list of {{\"type\": \"function\", \"function\": "
                   "{\"name\", ...}} objects, with \"messages\"")
    targs: dict[str, Any] = {}
    if "enable_thinking" in obj:
        if not isinstance(obj["enable_thinking"], bool):
            return Job(n, rid, error=f"line {n}: \"enable_thinking\" must be true or false")
        targs["enable_thinking"] = obj["enable_thinking"]
    if "reasoning_effort" in obj:
        if obj["reasoning_effort"] not in ("low", "medium", "high"):
            return Job(n, rid, error=f"line {n}: \"reasoning_effort\" must be \"low\", \"medium\" or \"high\"")
        targs["reasoning_effort"] = obj["reasoning_effort"]
    changes: dict[str, Any] = {}
    for k, field in LINE_PARAMS.items():
        if k in obj:
            v = obj[k]
            if field == "stop":
                v = (v,) if isinstance(v, str) else v
                if not isinstance(v, (list, tuple)) or not all(isinstance(s, str) for s in v):
                    return Job(n, rid, error=f"line {n}: \"stop\" must be a string or a list of strings")
                v = tuple(v)
            elif field in ("max_tokens", "top_k", "seed"):
                if not isinstance(v, int) or isinstance(v, bool):
                    return Job(n, rid, error=f"line {n}: {k!r} must be an integer")
            elif not isinstance(v, (int, float)) or isinstance(v, bool):
                return Job(n, rid, error=f"line {n}: {k!r} must be a number")
            changes[field] = v
    if obj.get("response_format") is not None:  # structured output: a grammar from the schema
        from moelocal.grammar import response_format_grammar

        try:
            changes["grammar"] = response_format_grammar(obj["response_format"])
        except UsageError as exc:
            return Job(n, rid, error=f"line {n}: {exc.message}")
    if "seed" not in changes and seed is not None:
        # each request its own seed, fixed by --seed and its id: the same answer whatever the order
        changes["seed"] = (seed + zlib.crc32(key.encode())) % (2**32 - 1)
    params = replace(base, **changes)
    try:
        params.check()
    except UsageError as exc:
        return Job(n, rid, error=f"line {n}: {exc.message}")
    return Job(n, rid, prompt=prompt, messages=messages, params=params, tools=tools, template_args=targs)


def _valid_messages(messages: Any) -> bool:
    # content may be None (an assistant's tool calls) or a list of parts, as OpenAI's API allows
    return (isinstance(messages, list) and bool(messages)
            and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                    and (isinstance(m.get("content"), (str, list))
                         or (m.get("content") is None and bool(m.get("tool_calls"))))
                    for m in messages))


def _key(rid: Any) -> str:
    return json.dumps(rid)


def _done(path: Path) -> tuple[set[str], set[int]]:
    """Ids (and, for records without one, line numbers) already written to an earlier run's output."""
    ids: set[str] = set()
    lines: set[int] = set()
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return ids, lines
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    for raw in text.splitlines():
        try:
            rec = json.loads(raw)
        except json.JSONDecodeError:
            continue  # a record cut short when the last run was killed: it is run again
        if not isinstance(rec, dict):
            continue
        if rec.get("id") is not None:
            ids.add(_key(rec["id"]))
        elif isinstance(rec.get("line"), int):
            lines.add(rec["line"])
    return ids, lines


def _is_done(job: Job, ids: set[str], lines: set[int]) -> bool:
    if job.id is None:
        return job.line in lines
    if job.error is not None and job.error.startswith(f"line {job.line} repeats id"):
        return _key(job.id) in ids  # its first occurrence is done: nothing new to say
    return _key(job.id) in ids


def _open_output(path: Path | None) -> IO[str]:
    if path is None:
        return sys.stdout
    try:
        fh = open(path, "a+", encoding="utf-8")  # noqa: SIM115  closed by batch()
        fh.seek(0, 2)
        if fh.tell():
            fh.seek(fh.tell() - 1)
            if fh.read(1) != "\n":  # a record cut short by a kill: end it so ours starts on its own line
                fh.write("\n")
        return fh
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror or exc}") from None


def _write(sink: IO[str], record: dict) -> None:
    """One record, whole, in a single write, then flushed: a kill never leaves half of it behind twice."""
    sink.write(json.dumps(record, ensure_ascii=False) + "\n")
    sink.flush()


class _Bar:
    """A progress bar on stderr when a person is watching; nothing otherwise."""

    def __init__(self, total: int) -> None:
        self.progress = None
        if _output.err.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("batch"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                     console=_output.err, transient=False)
            self.task = self.progress.add_task("batch", total=total)
            self.progress.start()

    def advance(self, done: int) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=done)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


def register(app: typer.Typer) -> None:
    app.command("batch")(batch)
