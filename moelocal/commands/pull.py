"""`moelocal pull`: download one quantization of a Hugging Face repo into the Hugging Face cache."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from moelocal import _output
from moelocal.commands._common import JsonOpt
from moelocal.errors import DoesNotFitError, UsageError


def pull(
    model: Annotated[str, typer.Argument(help="A Hugging Face repo: org/name, org/name:QUANT or org/name@REVISION.",
                                         show_default=False)],
    quant: Annotated[str | None, typer.Option("--quant", "-q", help="The quantization to download (Q4_K_M, "
                                              "case-insensitive). Default: the one `fit` recommends here.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show what would be downloaded, then stop.")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Download without asking.")] = False,
    verify: Annotated[bool, typer.Option("--verify", help="Also check the sha256 of files already in the cache "
                                         "(reads them all) and fetch again any that fails.")] = False,
    json: JsonOpt = False,
) -> None:
    """Download a GGUF model from Hugging Face into its cache, where other tools find it too.

    Every shard of a split set is downloaded; free disk space is checked first; an interrupted
    download resumes where it stopped; each file is checked against the sha256 the Hub lists, and a
    file that fails is fetched again. Without --quant, the quantization `fit` recommends for this
    machine is chosen (and said so). Shows the plan and asks before it downloads, unless -y.
    Prints the local paths (the first shard first) on stdout.

    Honours HF_TOKEN (gated repos), HF_ENDPOINT (mirrors), HF_HUB_OFFLINE and HF_HOME / HF_HUB_CACHE.

    Examples:

      moelocal pull unsloth/Qwen3-30B-A3B-GGUF:Q4_K_M

      moelocal pull Qwen/Qwen3-30B-A3B-GGUF --dry-run

      llama-server -m "$(moelocal pull org/Model-GGUF:Q8_0 -y | head -1)"
    """
    from moelocal import hub

    ref = hub.parse_repo_ref(model)
    if quant and ref.quant and quant.lower() != ref.quant.lower():
        raise UsageError(f"{model} names {ref.quant} but --quant says {quant}", "give the quantization once")
    wanted = quant or ref.quant
    recommended = False
    if wanted is None:
        quants = hub.list_quants(ref)
        recommended = len(quants) > 1  # with one quantization there is nothing to choose
        wanted = recommended_quant(ref) if recommended else quants[0].name
    plan = hub.plan_download(ref, wanted)
    show_plan(plan, recommended)
    if dry_run:
        if json:
            _output.print_json({**plan.to_dict(), "recommended": recommended})
        return
    if plan.to_download and not yes:
        confirm(plan)
    paths = fetch(plan, verify)
    if json:
        _output.print_json({**plan.to_dict(), "recommended": recommended, "paths": [str(p) for p in paths]})
    else:
        for p in paths:
            _output.out.print(str(p), markup=False, highlight=False)


def recommended_quant(ref) -> str:
    """The quantization `fit` recommends for this machine, from the headers of every one of them."""
    from moelocal import hub, planner
    from moelocal.commands._common import hardware_options
    from moelocal.plan import RunOptions

    pairs = hub.summaries_for_repo(ref)
    summaries = [s for _, s in pairs]
    options = RunOptions(n_ctx=planner.default_ctx(summaries[0]))
    chosen = planner.recommend_quant(summaries, hardware_options(), options, ctx_requested=False)
    if chosen is None:
        raise DoesNotFitError(f"no quantization of {ref.repo} fits this machine",
                              f"see `moelocal fit {ref.repo}`, or choose one with --quant")
    return pairs[chosen][0].name


def show_plan(plan, recommended: bool) -> None:
    """The plan, for people (stderr): which files, how much, where, and what is already here."""
    hb = _output.human_bytes
    err = _output.err
    why = " (fit's recommendation for this machine)" if recommended else ""
    err.print(f"{plan.quant.ref}{why}, commit {plan.commit[:12]}", markup=False, soft_wrap=True)
    for p in plan.files:
        state = "in the cache" if p.cached else f"resumes at {hb(p.partial)}" if p.partial else ""
        err.print(f"  {p.file.path}  {hb(p.file.size)}" + (f"  ({state})" if state else ""), markup=False,
                  soft_wrap=True)
    if plan.to_download:
        err.print(f"To download: {hb(plan.to_download)} into {plan.cache_dir} ({hb(plan.free)} free)",
                  markup=False, soft_wrap=True)
    else:
        err.print(f"Already downloaded, in {plan.cache_dir}", markup=False, soft_wrap=True)


def confirm(plan) -> None:
    if not sys.stdin.isatty():
        raise UsageError(f"not asking whether to download {_output.human_bytes(plan.to_download)}: "
                         "the input is not a terminal", "add -y to download without asking")
    typer.confirm(f"Download {_output.human_bytes(plan.to_download)}?", default=True, abort=True, err=True)


def fetch(plan, verify: bool = False) -> list[Path]:
    """Run the download with one progress bar on stderr (when it is a terminal)."""
    from moelocal import hub

    err = _output.err
    progress = None
    task = None
    if err.is_terminal and plan.to_download:
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
                            TransferSpeedColumn(),
                            TimeRemainingColumn(), console=err)

    def on_progress(done: int, total: int) -> None:
        nonlocal task
        if progress is None:
            return
        if task is None:
            task = progress.add_task(plan.quant.ref, total=total, completed=done)
        else:
            progress.update(task, completed=done, total=total)

    try:
        if progress is not None:
            with progress:
                paths = hub.download(plan, on_progress, verify_cached=verify)
        else:
            paths = hub.download(plan, on_progress, verify_cached=verify)
    except KeyboardInterrupt:
        err.print("The partial download is kept; run the same command to resume it.", markup=False, soft_wrap=True)
        raise
    if plan.to_download:
        err.print(f"Downloaded {_output.human_bytes(plan.to_download)} of {plan.quant.ref}; sha256 checked.",
                  markup=False, soft_wrap=True)
    return paths


def register(app: typer.Typer) -> None:
    app.command("pull")(pull)
