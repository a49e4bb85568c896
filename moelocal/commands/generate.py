"""`moelocal generate`: one completion, for scripts and pipes."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from moelocal import _output
from moelocal.commands._common import JsonOpt
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
    OverrideTensorOpt,
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
    show_template_notes,
    status_line,
    template_args,
)
from moelocal.errors import UsageError


def generate(
    model: Annotated[str | None, typer.Argument(help="A .gguf file (any shard of a split set), or a Hugging Face "
                                                "repo org/name[:QUANT]. Omitted: the bundled demo model.",
                                                show_default=False)] = None,
    prompt: Annotated[str | None, typer.Option("--prompt", "-p", help="The prompt. Default: read from stdin.",
                                               show_default=False)] = None,
    system: SystemOpt = None,
    raw: Annotated[bool, typer.Option("--raw", help="Complete the prompt as plain text, without the model's "
                                      "chat template.")] = False,
    max_tokens: MaxTokensOpt = 512,
    temp: TempOpt = None,
    top_p: TopPOpt = None,
    top_k: TopKOpt = None,
    min_p: MinPOpt = None,
    repeat_penalty: RepeatPenaltyOpt = None,
    presence_penalty: PresencePenaltyOpt = 0.0,
    frequency_penalty: FrequencyPenaltyOpt = 0.0,
    seed: SeedOpt = None,
    json_schema: Annotated[Path | None, typer.Option(
        "--json-schema", help="Answer with JSON that validates against the JSON schema in this file (decoding is "
        "constrained by a llama.cpp grammar built from it).", show_default=False)] = None,
    json: JsonOpt = False,
    show_reasoning: Annotated[bool, typer.Option("--show-reasoning", help="Write the model's thinking to stderr "
                                                 "as it comes (stdout carries the answer alone).",
                                                 rich_help_panel="Reasoning")] = False,
    think: ThinkOpt = None,
    reasoning_effort: ReasoningEffortOpt = None,
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
    """Generate one answer and print it on stdout (plain text when stdout is not a terminal).

    The prompt goes through the model's chat template as a user message, unless --raw. A model that
    thinks before it answers (Qwen3, gpt-oss, DeepSeek ...) has its thinking kept apart: stdout gets
    the answer alone, --show-reasoning writes the thinking to stderr. With --json, prints one record
    instead: the answer (content), the thinking (reasoning), the text as the model wrote it, token
    counts, timings, finish reason and the seed used.

    Examples:

      moelocal generate Qwen3-30B-A3B-Q4_K_M.gguf -p "Name three moons of Jupiter."

      echo "Once upon a time" | moelocal generate model.gguf --raw --max-tokens 64 --seed 1

      moelocal generate model.gguf -p "Hi" --json --temp 0

      moelocal generate model.gguf -p "A city and its country" --json-schema city.schema.json

      moelocal generate gpt-oss-20b-mxfp4.gguf -p "Why is the sky blue?" --show-reasoning --reasoning-effort low
    """
    if prompt is None:
        if sys.stdin.isatty():
            raise UsageError("no prompt", "give one with -p TEXT or on stdin")
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise UsageError("the prompt is empty", "give one with -p TEXT or on stdin")
    if raw and system:
        raise UsageError("--system needs the chat template", "drop --raw, or put the text in the prompt")
    params = sampling(temp=temp, top_p=top_p, seed=seed, max_tokens=max_tokens, ignore_eos=ignore_eos,
                     top_k=top_k, min_p=min_p, repeat_penalty=repeat_penalty,
                     presence_penalty=presence_penalty, frequency_penalty=frequency_penalty)
    if json_schema is not None:  # before the model loads: a bad schema fails at once
        from moelocal.grammar import read_schema, schema_grammar

        params = replace(params, grammar=schema_grammar(read_schema(json_schema)))
    flags = PlacementFlags(plan=plan, cpu_moe=cpu_moe, n_cpu_moe=n_cpu_moe, ngl=ngl, force=force, kv_type=kv_type,
                           flash_attn=flash_attn,
                           workers=tuple(worker or ()), worker_mem=tuple(worker_mem or ()), net_bw=net_bw,
                           overrides=tuple(override_tensor or ()))
    engine, summary = open_engine(model, flags, ctx=ctx, threads=threads)
    with engine:
        from moelocal.formats import Parser

        if raw:
            tokens = engine.tokenize(prompt)
            parser = Parser(prompt)  # plain text in, plain text out: nothing to take apart
        else:
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": prompt}
            ]
            fmt = engine.chat_format
            if params.grammar and think is None and fmt.thinking_toggle:
                think = False  # the grammar constrains every token: no room for thinking before the JSON
            text = engine.render_chat(messages, **template_args(fmt, enable_thinking=think,
                                                                 reasoning_effort=reasoning_effort))
            show_template_notes(engine)
            tokens = engine.prompt_tokens(text)
            # under a grammar all the model writes is the constrained answer, whatever the prompt opened
            parser = Parser(text) if params.grammar else fmt.parser(text)
        last = None
        pieces = []
        out, err = sys.stdout, sys.stderr
        shown = for_terminal if out.isatty() else str  # piped text stays exactly what the model wrote
        dim = err.isatty()
        thinking = False  # the last thing written to stderr was reasoning
        for chunk in engine.generate(tokens, params):
            last = chunk
            pieces.append(chunk.text)
            deltas = parser.feed(chunk.text) + (parser.flush() if chunk.done else [])
            if json:
                continue
            for d in deltas:
                if d.kind == "reasoning" and show_reasoning:
                    err.write(("\x1b[2m" + for_terminal(d.text) + "\x1b[0m") if dim else d.text)
                    err.flush()
                    thinking = True
                elif d.kind == "content":
                    if thinking:
                        err.write("\n")
                        err.flush()
                        thinking = False
                    out.write(shown(d.text))
                    out.flush()
        assert last is not None
        msg = parser.finish()
        if json:
            _output.print_json(record(last, summary.name, "".join(pieces), msg))
            return
        if thinking:
            err.write("\n")
        out.write("\n")
        out.flush()
        if _output.err.is_terminal:
            note(status_line(engine, summary, last) + f" · {last.finish_reason} · seed {last.seed}")


def record(last, model_name: str, text: str, msg=None) -> dict:
    """The --json record of one finished completion: ``last`` is its final chunk, ``text`` all the model
    wrote, ``msg`` that text taken apart (moelocal.formats.Message): the answer and the thinking."""
    return {
        "model": model_name,
        "content": msg.content if msg is not None else text,
        "reasoning": msg.reasoning if msg is not None else "",
        "text": text,
        "prompt_tokens": last.prompt_tokens,
        "completion_tokens": last.completion_tokens,
        "finish_reason": last.finish_reason,
        "prompt_seconds": round(last.prompt_seconds, 6),
        "generation_seconds": round(last.generation_seconds, 6),
        "prompt_tps": round(last.prompt_tps, 2),
        "generation_tps": round(last.generation_tps, 2),
        "seed": last.seed,
    }


def register(app: typer.Typer) -> None:
    app.command("generate")(generate)
