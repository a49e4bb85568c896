"""`moelocal list` and `moelocal rm`: the GGUF models in the Hugging Face cache."""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from rich.table import Table

from moelocal import _output
from moelocal.commands._common import JsonOpt
from moelocal.errors import UsageError


def list_models(
    json: JsonOpt = False,
    vram: Annotated[list[str] | None, typer.Option("--vram", help="Judge 'fits' for GPUs with this much memory "
                                                   "(24GiB; repeat or comma-separate for several).")] = None,
    ram: Annotated[str | None, typer.Option("--ram", help="Judge 'fits' for this much free RAM (64GiB).")] = None,
    no_gpu: Annotated[bool, typer.Option("--no-gpu", help="Judge 'fits' for the CPU alone.")] = False,
) -> None:
    """List the GGUF models in the Hugging Face cache: repo, quantization, size, fits here, path.

    Whether each fits is what `moelocal fit` says for this machine (or the one --vram/--ram describe),
    with the predicted decode speed. One row per quantization and commit; a split set is one row,
    and one with shards missing says how many it has. The path is the first shard's, the file
    llama.cpp opens.

    Examples:

      moelocal list

      moelocal list --json
    """
    from moelocal import hub

    models = hub.cached_models()
    verdicts = _verdicts(models, vram=vram, ram=ram, no_gpu=no_gpu)
    if json:
        _output.print_json([{**m.to_dict(), "fits": v[0], "verdict": v[1]} for m, v in zip(models, verdicts,
                                                                                          strict=True)])
        return
    if not models:
        _output.err.print(f"No GGUF models in the Hugging Face cache ({hub.hf_cache_dir()}); download one with "
                          "`moelocal pull org/repo:QUANT`.", style="dim", markup=False, soft_wrap=True)
        return
    hb = _output.human_bytes
    rows = [(m.ref, hb(m.size), _files(m), v[1], str(m.files[0])) for m, v in zip(models, verdicts, strict=True)]
    if not sys.stdout.isatty():  # a pipe gets tab-separated rows, whole paths and no decoration
        for row in rows:
            sys.stdout.write("\t".join(row) + "\n")
        return
    table = Table()
    for col in ("model", "size", "files", "here", "path"):
        table.add_column(col, justify="right" if col == "size" else "left", overflow="fold")
    for row in rows:
        table.add_row(*row)
    _output.out.print(table)


def _verdicts(models, **overrides) -> list[tuple[bool | None, str]]:
    """Whether each complete model fits this machine, as `fit` would say (from the local header)."""
    from moelocal import planner
    from moelocal.commands._common import hardware_options
    from moelocal.errors import MoelocalError
    from moelocal.gguf_model import read_summary
    from moelocal.plan import RunOptions

    if not models:
        return []
    hw = hardware_options(**overrides)
    out: list[tuple[bool | None, str]] = []
    for m in models:
        if not m.complete:
            out.append((None, "incomplete"))
            continue
        try:
            s = read_summary(m.files[0])
            result = planner.fit(s, hw, RunOptions(n_ctx=planner.default_ctx(s)), ctx_requested=False)
        except MoelocalError as exc:
            out.append((None, f"unreadable: {exc.message}"))
            continue
        best = result.best
        out.append((best is not None, f"fits, {best.predicted.decode_tps:.0f} tok/s" if best else "does not fit"))
    return out


def _files(m) -> str:
    return str(len(m.files)) if m.complete else f"{len(m.files)} of {m.n_expected}"


def rm(
    model: Annotated[str, typer.Argument(help="org/name (every quantization) or org/name:QUANT.",
                                         show_default=False)],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Delete without asking.")] = False,
) -> None:
    """Delete a model from the Hugging Face cache: the whole repo, or one quantization of it.

    Goes through huggingface_hub's cache API, so a file another revision still uses is kept.

    Examples:

      moelocal rm unsloth/Qwen3-30B-A3B-GGUF:Q8_0

      moelocal rm unsloth/Qwen3-30B-A3B-GGUF -y
    """
    from moelocal import hub

    removal = hub.plan_removal(model)
    err = _output.err
    what = f"{removal.repo}:{removal.quant}" if removal.quant else removal.repo
    scope = "" if removal.quant else " (the whole repo)"
    err.print(f"To delete: {what}{scope}, {len(removal.files)} files, freeing {_output.human_bytes(removal.freed)}",
              markup=False, soft_wrap=True)
    for path in removal.files:
        err.print(f"  {path}", markup=False, soft_wrap=True)
    if not yes:
        if not sys.stdin.isatty():
            raise UsageError("not asking whether to delete: the input is not a terminal",
                             "add -y to delete without asking")
        typer.confirm("Delete?", default=False, abort=True, err=True)
    hub.remove(removal)
    err.print(f"Deleted {what}.", markup=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command("list")(list_models)
    app.command("rm")(rm)
