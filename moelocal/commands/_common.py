"""Option aliases shared by several commands."""

from __future__ import annotations

from typing import Annotated

import typer

JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
ModelArg = Annotated[
    str | None,
    typer.Argument(
        help="A .gguf file (any shard of a split set), or a Hugging Face repo org/name[:QUANT]. "
        "Omitted: the bundled demo model.",
        show_default=False,
    ),
]


def load_summary(text: str | None):
    """Resolve MODEL to a ModelSummary, saying so when the demo model stands in."""
    from moelocal import _output
    from moelocal.gguf_model import read_summary
    from moelocal.source import parse_ref

    ref = parse_ref(text)
    if ref.is_demo:
        _output.note(f"Using the bundled demo model ({ref.path.name}); give a .gguf path or org/repo for a real one.")
    if ref.path is not None:
        return read_summary(ref.path)
    from moelocal.hub import summary_for_ref  # imported late: pulls in huggingface_hub

    return summary_for_ref(ref)


def load_summaries(refs: list[str] | None):
    """One or more models for `fit`: files, folders of .gguf files, or Hub repos (every quantization)."""
    from pathlib import Path

    from moelocal.errors import ModelFileError
    from moelocal.gguf_model import split_set

    if not refs:
        return [load_summary(None)]
    out = []
    for text in refs:
        path = Path(text).expanduser()
        if path.is_dir():
            files = sorted(p for p in path.glob("*.gguf") if not _not_a_model(p.name))
            seen: set[Path] = set()
            for f in files:
                if f in seen:
                    continue
                seen.update(split_set(f))
                out.append(load_summary(str(f)))
            if not files:
                raise ModelFileError(f"{path} has no .gguf model files", "give a .gguf file or a folder with some")
            continue
        from moelocal.source import parse_ref

        ref = parse_ref(text)
        if ref.repo is not None and ref.quant is None:
            from moelocal.hub import summaries_for_repo

            out.extend(s for _, s in summaries_for_repo(ref))
        else:
            out.append(load_summary(text))
    return out


def _not_a_model(name: str) -> bool:
    lower = name.lower()
    return "mmproj" in lower or "imatrix" in lower


def hardware_options(*, vram=None, ram=None, no_gpu=False, gpu_bw=None, cpu_bw=None, workers=None, worker_mem=None,
                     net_bw=None, gpu=None):
    """This machine, with the user's overrides applied and the workers' devices (probed now) added."""
    from dataclasses import replace

    from moelocal import hardware
    from moelocal.errors import UsageError

    if (worker_mem or net_bw) and not workers:
        raise UsageError("--worker-mem and --net-bw describe workers", "add --worker HOST:PORT")
    hw = hardware.detect()
    hw = hardware.with_overrides(hw, gpu=gpu, vram=vram, ram=ram, no_gpu=no_gpu, gpu_bw=gpu_bw, cpu_bw=cpu_bw)
    from moelocal import calibration

    if not calibration.applies(hw):  # another machine described: this one's measurements say nothing about it
        hw = replace(hw, calibration=None)
    if workers:
        from moelocal import rpc

        hw = rpc.with_workers(hw, workers, mem=worker_mem, net_bw=net_bw)
    return hw
