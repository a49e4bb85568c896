"""`moelocal generate`: one completion, for scripts and pipes."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from moelocal import _output
from moelocal.commands._common import JsonOpt
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
    status_line,
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
    temp: TempOpt = 0.8,
    top_p: TopPOpt = 0.95,
    seed: SeedOpt = None,
    json: JsonOpt = False,
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

    The prompt goes through the model's chat template as a user message, unless --raw. With --json,
    prints one record instead: text, token counts, timings, finish reason and the seed used.

    Examples:

      moelocal generate Qwen3-30B-A3B-Q4_K_M.gguf -p "Name three moons of Jupiter."

      echo "Once upon a time" | moelocal generate model.gguf --raw --max-tokens 64 --seed 1

      moelocal generate model.gguf -p "Hi" --json --temp 0
    """
    if prompt is None:
        if sys.stdin.isatty():
            raise UsageError("no prompt", "give one with -p TEXT or on stdin")
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise UsageError("the prompt is empty", "give one with -p TEXT or on stdin")
    if raw and system:
        raise UsageError("--system needs the chat template", "drop --raw, or put the text in the prompt")
    params = sampling(temp=temp, top_p=top_p, seed=seed, max_tokens=max_tokens, ignore_eos=ignore_eos)
    flags = PlacementFlags(plan=plan, cpu_moe=cpu_moe, n_cpu_moe=n_cpu_moe, ngl=ngl, force=force, kv_type=kv_type,
                           flash_attn=flash_attn,
                           workers=tuple(worker or ()), worker_mem=tuple(worker_mem or ()), net_bw=net_bw,
                           overrides=tuple(override_tensor or ()))
    engine, summary = open_engine(model, flags, ctx=ctx, threads=threads)
    with engine:
        if raw:
            stream = engine.generate(prompt, params)
        else:
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": prompt}
            ]
            stream = engine.chat(messages, params)
        last = None
        pieces = []
        out = sys.stdout
        shown = for_terminal if out.isatty() else str  # piped text stays exactly what the model wrote
        for chunk in stream:
            last = chunk
            pieces.append(chunk.text)
            if not json and chunk.text:
                out.write(shown(chunk.text))
                out.flush()
        assert last is not None
        if json:
            _output.print_json(record(last, summary.name, "".join(pieces)))
            return
        out.write("\n")
        out.flush()
        if _output.err.is_terminal:
            note(status_line(engine, summary, last) + f" · {last.finish_reason} · seed {last.seed}")


def record(last, model_name: str, text: str) -> dict:
    """The --json record of one finished completion: ``last`` is its final chunk, ``text`` the whole."""
    return {
        "model": model_name,
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
