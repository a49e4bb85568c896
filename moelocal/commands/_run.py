"""What the commands that run a model share: sampling and placement options, resolving MODEL,
building the plan (the planner's, or the one the flags force), and loading the engine with a bar."""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from moelocal import _output
from moelocal.errors import DoesNotFitError, HubError, UsageError

if TYPE_CHECKING:
    from moelocal.engine import Engine, SamplingParams
    from moelocal.gguf_model import ModelSummary
    from moelocal.plan import Plan

_PLACE = "Placement (default: what `moelocal fit` recommends)"
_SAMPLE = "Sampling"

# Sampling flags default to None: unset, a run takes the model's recommendation (its GGUF's
# general.sampling.* keys) or else llama.cpp's default, named in each help text.
_REC = "Default: the model's recommendation, else"
TempOpt = Annotated[float | None, typer.Option("--temp", help=f"Temperature; 0 always takes the likeliest token. "
                                               f"{_REC} 0.8.", rich_help_panel=_SAMPLE, show_default=False)]
TopPOpt = Annotated[float | None, typer.Option("--top-p", help="Nucleus sampling: draw from the likeliest tokens "
                                               f"that make up this much probability. {_REC} 0.95.",
                                               rich_help_panel=_SAMPLE, show_default=False)]
TopKOpt = Annotated[int | None, typer.Option("--top-k", help=f"Draw from the K likeliest tokens only (0: all). "
                                             f"{_REC} 40.", rich_help_panel=_SAMPLE, show_default=False)]
MinPOpt = Annotated[float | None, typer.Option("--min-p", help="Drop tokens less likely than this share of the "
                                               f"likeliest one. {_REC} 0.05.", rich_help_panel=_SAMPLE,
                                               show_default=False)]
RepeatPenaltyOpt = Annotated[float | None, typer.Option(
    "--repeat-penalty", help=f"Make the last 64 tokens less likely to come again (1: off). {_REC} 1.",
    rich_help_panel=_SAMPLE, show_default=False)]
PresencePenaltyOpt = Annotated[float, typer.Option(
    "--presence-penalty", help="OpenAI's presence penalty, -2..2: lower every token already seen by this much.",
    rich_help_panel=_SAMPLE)]
FrequencyPenaltyOpt = Annotated[float, typer.Option(
    "--frequency-penalty", help="OpenAI's frequency penalty, -2..2: lower every token by this much per time seen.",
    rich_help_panel=_SAMPLE)]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Random seed: the same seed gives the same text. "
                                             "Default: a new one each time.", rich_help_panel=_SAMPLE)]
MaxTokensOpt = Annotated[int, typer.Option("--max-tokens", "-n", help="Stop after this many tokens.",
                                           rich_help_panel=_SAMPLE)]
IgnoreEosOpt = Annotated[bool, typer.Option("--ignore-eos", hidden=True,
                                            help="Keep generating past end-of-turn tokens (benchmarks, tests).")]
CtxOpt = Annotated[int | None, typer.Option("--ctx", "-c", help="Context length in tokens. Default: the "
                                            "model's, up to 32768, reduced (and said so) only if it does not fit.")]
ThreadsOpt = Annotated[int | None, typer.Option("--threads", "-t", help="CPU threads. Default: one per "
                                                "physical core.")]
PlanOpt = Annotated[str, typer.Option("--plan", help="auto: the placement `moelocal fit` recommends.",
                                      rich_help_panel=_PLACE)]
CpuMoeOpt = Annotated[bool, typer.Option("--cpu-moe", help="Keep every routed expert in RAM (llama.cpp --cpu-moe).",
                                         rich_help_panel=_PLACE)]
NCpuMoeOpt = Annotated[int | None, typer.Option("--n-cpu-moe", help="Keep the routed experts of the first N layers "
                                                "in RAM (llama.cpp --n-cpu-moe).", rich_help_panel=_PLACE)]
NglOpt = Annotated[int | None, typer.Option("--ngl", "-ngl", help="Layers to put on the GPU (llama.cpp -ngl).",
                                            rich_help_panel=_PLACE)]
OverrideTensorOpt = Annotated[list[str] | None, typer.Option(
    "--override-tensor", "-ot", help="llama.cpp's tensor overrides, PATTERN=BUFFER_TYPE (regex searched in each "
    "tensor's name; CPU, CUDA0, RPC0[host:port] ...), comma-separated or repeated; the first matching pattern "
    "wins, and they come before --n-cpu-moe's. Without --ngl every layer is offloaded.", rich_help_panel=_PLACE)]
ForceOpt = Annotated[bool, typer.Option("--force", help="Run a placement you forced even if moelocal "
                                        "predicts it does not fit.", rich_help_panel=_PLACE)]
KvTypeOpt = Annotated[str, typer.Option("--kv-type", help="KV cache type: f16, q8_0 or q4_0 (the quantized "
                                        "ones need flash attention).", rich_help_panel=_PLACE)]
FlashAttnOpt = Annotated[bool, typer.Option("--flash-attn/--no-flash-attn", help="Use flash attention (on by "
                                            "default, as llama.cpp's auto setting is on CPU, CUDA and Metal).",
                                            rich_help_panel=_PLACE)]
SystemOpt = Annotated[str | None, typer.Option("--system", "-s", help="A system message to start with.")]
WorkerOpt = Annotated[list[str] | None, typer.Option(
    "--worker", help="Also place layers on the devices of a `moelocal worker` on another machine, as HOST:PORT; "
    "repeat for several.", rich_help_panel=_PLACE)]
WorkerMemOpt = Annotated[list[str] | None, typer.Option(
    "--worker-mem", help="Plan for this much memory on the workers' devices instead of what they report (4GiB); "
    "repeat or comma-separate, one per device in --worker order.", rich_help_panel=_PLACE)]
NetBwOpt = Annotated[str | None, typer.Option(
    "--net-bw", help="Network bandwidth to the workers (1Gbit, 10Gbit, 1.25GB/s). Default: 1Gbit.",
    rich_help_panel=_PLACE)]


@dataclass(frozen=True)
class PlacementFlags:
    """The placement flags as given: all None/False means 'let the planner choose'."""

    plan: str = "auto"
    cpu_moe: bool = False
    n_cpu_moe: int | None = None
    ngl: int | None = None
    force: bool = False
    kv_type: str = "f16"
    flash_attn: bool = True  # llama.cpp's "auto" turns it on wherever the backend has it
    workers: tuple[str, ...] = ()  # HOST:PORT of RPC workers whose devices join the plan
    worker_mem: tuple[str, ...] = ()
    net_bw: str | None = None
    overrides: tuple[str, ...] = ()  # -ot values as given (PATTERN=BUFFER_TYPE,...)

    @property
    def forced(self) -> bool:
        return self.cpu_moe or self.n_cpu_moe is not None or self.ngl is not None or bool(self.overrides)


def sampling(*, temp: float | None, top_p: float | None, seed: int | None, max_tokens: int, ignore_eos: bool = False,
             stop: tuple[str, ...] = (), top_k: int | None = None, min_p: float | None = None,
             repeat_penalty: float | None = None, presence_penalty: float = 0.0,
             frequency_penalty: float = 0.0) -> SamplingParams:
    """The sampling flags as SamplingParams (checked); those not given stay None for the model's own."""
    from moelocal.engine import SamplingParams

    return SamplingParams(temperature=temp, top_p=top_p, top_k=top_k, min_p=min_p, seed=seed, max_tokens=max_tokens,
                          ignore_eos=ignore_eos, stop=stop, repeat_penalty=repeat_penalty,
                          presence_penalty=presence_penalty, frequency_penalty=frequency_penalty).check()


def sampling_line(engine: Engine, params: SamplingParams) -> str:
    """'temp 0.6 · top-k 20 · top-p 0.95 · min-p 0 · repeat 1 (temp, top-k, top-p from the model)' for people."""
    p = engine.sampling(params)
    parts = [f"temp {p.temperature:g}", f"top-k {p.top_k}", f"top-p {p.top_p:g}", f"min-p {p.min_p:g}",
             f"repeat {p.repeat_penalty:g} (last {p.penalty_last_n})"]
    if p.presence_penalty or p.frequency_penalty:
        parts.append(f"presence {p.presence_penalty:g} · frequency {p.frequency_penalty:g}")
    names = {"temperature": "temp", "top_k": "top-k", "top_p": "top-p", "min_p": "min-p", "repeat_penalty": "repeat",
             "penalty_last_n": "last n"}
    from_model = [names[k] for k in names if k in engine.recommended and getattr(params, k) is None]
    return " · ".join(parts) + (f" ({', '.join(from_model)} from the model)" if from_model else "")


def resolve_model(text: str | None) -> tuple[Path, ModelSummary]:
    """MODEL → (local file, its summary). A Hub reference is taken from the cache (pulled if missing)."""
    from moelocal.gguf_model import read_summary
    from moelocal.source import parse_ref

    ref = parse_ref(text)
    if ref.is_demo:
        note(f"Using the bundled demo model ({ref.path.name}); give a .gguf path or org/repo for a real one.")
    if ref.path is not None:
        return ref.path, read_summary(ref.path)
    from moelocal import hub  # imported late: pulls in huggingface_hub

    try:
        path = Path(hub.local_model(ref))
    except HubError:
        if not sys.stdin.isatty():
            raise  # nobody to ask: the error says how to pull it
        path = _pull_after_asking(ref)
    return path, read_summary(path)


def _pull_after_asking(ref) -> Path:
    """A Hub model that is not downloaded yet: show what `pull` would fetch, ask, then fetch it."""
    from moelocal import hub
    from moelocal.commands import pull as pull_cmd

    wanted = ref.quant
    recommended = False
    if wanted is None:
        quants = hub.list_quants(ref)
        recommended = len(quants) > 1
        wanted = pull_cmd.recommended_quant(ref) if recommended else quants[0].name
    download = hub.plan_download(ref, wanted)
    pull_cmd.show_plan(download, recommended)
    if download.to_download:
        typer.confirm(f"Download {_output.human_bytes(download.to_download)} now?", default=True, abort=True,
                      err=True)
    return Path(pull_cmd.fetch(download)[0])


def build_plan(summary: ModelSummary, flags: PlacementFlags, *, ctx: int | None, threads: int | None,
               n_seq: int = 1, hw=None) -> Plan:
    """The plan for this run: the planner's choice, or the placement the flags force, checked against memory.

    ``ctx`` is per sequence; with ``n_seq`` parallel sequences the KV cache holds ``ctx * n_seq`` tokens.
    """
    from moelocal import hardware, planner
    from moelocal.plan import RunOptions

    if flags.plan != "auto":
        raise UsageError(f"unknown --plan {flags.plan!r}", "use --plan auto, or force a placement with --cpu-moe, "
                         "--n-cpu-moe N or --ngl N")
    if flags.cpu_moe and flags.n_cpu_moe is not None:
        raise UsageError("--cpu-moe and --n-cpu-moe contradict each other", "give one of them")
    if flags.ngl is not None and flags.ngl < 0:
        raise UsageError(f"--ngl must be 0 or more, got {flags.ngl}")
    if flags.kv_type not in ("f16", "q8_0", "q4_0", "f32", "bf16"):
        raise UsageError(f"unknown --kv-type {flags.kv_type!r}", "use f16, q8_0 or q4_0")
    if ctx is not None and ctx <= 0:
        raise UsageError(f"--ctx must be positive, got {ctx}")
    if threads is not None and threads <= 0:
        raise UsageError(f"--threads must be positive, got {threads}")
    per_seq = ctx if ctx is not None else planner.default_ctx(summary)
    options = RunOptions(n_ctx=per_seq * n_seq, n_seq=n_seq, kv_type=flags.kv_type, flash_attn=flags.flash_attn,
                         n_threads=threads, n_batch=2048, n_ubatch=512)
    hw = hw if hw is not None else hardware.detect()
    if (flags.worker_mem or flags.net_bw) and not flags.workers:
        raise UsageError("--worker-mem and --net-bw describe workers", "add --worker HOST:PORT")
    if flags.workers and not hw.workers:
        from moelocal import rpc

        hw = rpc.with_workers(hw, flags.workers, mem=flags.worker_mem, net_bw=flags.net_bw)
    if flags.forced and not hw.gpus:
        if flags.ngl:
            warn(f"--ngl {flags.ngl}: there is no GPU here, so every layer runs on the CPU")
        if flags.cpu_moe or flags.n_cpu_moe:
            note("No GPU here: the experts are in RAM with everything else.")
        if flags.overrides:
            note("No GPU here: -ot changes nothing, every tensor is in RAM.")
    from moelocal import layout, oracle

    plan = planner.plan_model(summary, hw, options, n_gpu_layers=flags.ngl, n_cpu_moe=flags.n_cpu_moe,
                              cpu_moe=flags.cpu_moe, overrides=layout.parse_tensor_overrides(flags.overrides, hw),
                              ctx_requested=ctx is not None, oracle=oracle.for_summary(summary))
    if not plan.fits:
        short = ", ".join(f"{_output.human_bytes(n)} more {'RAM' if d == 'cpu' else 'memory on ' + d.upper()}"
                          for d, n in plan.shortfall().items())
        msg = f"the placement you asked for does not fit {summary.name}: it needs {short or 'more memory'}"
        if not flags.force:
            raise DoesNotFitError(msg, "drop the placement flags to let moelocal choose, or add --force to try")
        warn(msg + "; trying anyway (--force)")
    for text in plan.notes:
        warn(text)
    p = plan.placement
    if flags.workers and not flags.forced and not (p.n_gpu_layers and any(d.startswith("rpc") for d in p.devices)):
        note("The plan leaves the workers unused: for this model, handing layers over the network would be slower.")
    return plan


def open_engine(model: str | None, flags: PlacementFlags, *, ctx: int | None, threads: int | None,
                n_seq: int = 1) -> tuple[Engine, ModelSummary]:
    """Resolve MODEL, plan it and load it, with a progress bar and any memory warnings on stderr."""
    path, summary = resolve_model(model)
    return load_engine(path, summary, flags, ctx=ctx, threads=threads, n_seq=n_seq), summary


def load_engine(path: Path, summary: ModelSummary, flags: PlacementFlags, *, ctx: int | None, threads: int | None,
                n_seq: int = 1, hw=None) -> Engine:
    """Plan a resolved model and load it (see open_engine)."""
    from moelocal import config, hardware, native
    from moelocal.engine import Engine

    detected = hw if hw is not None else hardware.detect()
    hw = runnable_hardware(detected)
    plan = build_plan(summary, flags, ctx=ctx, threads=threads, n_seq=n_seq, hw=hw)
    if config.debug():
        native.set_log_echo(lambda _level, line: sys.stderr.write(line + "\n"))
    label = plan.placement.describe(summary.n_layer)
    engine = _load_with_bar(Engine, path, plan, f"Loading {summary.name} ({label})", workers=flags.workers)
    for d in engine.deviations():
        where = "RAM" if d.device == "cpu" else d.device.upper()
        warn(f"llama.cpp allocated {_output.human_bytes(d.measured)} of {where} where the plan expected "
                     f"{_output.human_bytes(d.planned)}; `moelocal fit` may misjudge this model")
    _record_speeds(engine, summary, plan, detected)  # recorded under the machine as detected
    return engine


GPU_BACKENDS = ("CUDA", "ROCm", "Metal", "Vulkan", "SYCL", "MUSA", "CANN")


def llama_gpu_facts() -> tuple[int, tuple[str, ...], str]:
    """What llama.cpp makes of this machine's GPUs: how many it registered, the GPU backends it was
    built with, and the line its log gave when a backend found none (the boundary tests fake)."""
    from moelocal import native

    native.install_log()
    with native.capture_log() as lines:
        n = len(native.gpu_devices())
        reg = native._fn("ggml_backend_reg_by_name")
        built = tuple(b for b in GPU_BACKENDS if reg(b.encode()))
    said = [text.strip() for _, text in lines if "CUDA" in text or "no devices" in text.lower()]
    return n, built, said[-1].split(": ", 1)[-1] if said else ""


def runnable_hardware(hw):
    """``hw`` with only the GPUs this llama.cpp can use (hardware.usable_by_llama), saying why in one
    line: a warning when GPUs were found but cannot be used, a note when a GPU build finds none."""
    from moelocal import hardware

    had = sum(not g.remote for g in hw.gpus)
    n, built, why = llama_gpu_facts()
    hw, message = hardware.usable_by_llama(hw, n, built, why)
    if message:
        (warn if had else note)(message)
    return hw


def _record_speeds(engine: Engine, summary: ModelSummary, plan: Plan, hw) -> None:
    """Let the engine's finished requests add their speeds to this machine's calibration
    (calibration.Recorder), unless MOELOCAL_NO_CALIBRATE is set, the user described another machine,
    the plan uses workers, or the threads are not llama.cpp's default (the factors assume it)."""
    from moelocal import calibration, hardware

    p, o = plan.placement, plan.options
    if (not calibration.recording() or not calibration.applies(hw) or any(d.startswith("rpc") for d in p.devices)
            or (o.n_threads and o.n_threads != hardware.default_threads()) or p.from_disk):
        return
    command = next((a for a in sys.argv[1:3] if a in ("chat", "generate", "batch", "serve")), "run")
    observe(engine, calibration.Recorder(summary, p, o, hw, command))


def observe(engine: Engine, sink) -> None:
    """Hand the last chunk of every request ``engine`` runs to ``sink`` (one stream at a time only:
    side-by-side sequences do not decode at one stream's speed)."""
    generate, many = engine.generate, engine.generate_many

    def watched(chunks):
        for c in chunks:
            yield c
            if c.done and c.finish_reason != "error":
                try:
                    sink(c)
                except Exception:  # measuring must never break a run
                    pass

    def generate_watched(*args, **kwargs):
        return watched(generate(*args, **kwargs))  # generate checks its arguments now, not when iterated

    def many_watched(requests, parallel=None):
        chunks = many(requests, parallel)
        return watched(chunks) if min(parallel or engine.n_seq_max, engine.n_seq_max) == 1 else chunks

    engine.generate = generate_watched  # type: ignore[method-assign]
    engine.generate_many = many_watched  # type: ignore[method-assign]


def speed_line(engine: Engine, measured_tps: float) -> str:
    """'speed: predicted 41.0 tok/s (from rated bandwidths), measured 38.2 (0.93x)' for /stats."""
    pred = engine.plan.predicted
    line = f"speed: predicted {pred.decode_tps:.1f} tok/s" + (f" ({pred.basis})" if pred.basis else "")
    if measured_tps > 0 and pred.decode_tps > 0:
        line += f", measured {measured_tps:.1f} ({measured_tps / pred.decode_tps:.2f}x)"
    return line


def _load_with_bar(engine_cls, path: Path, plan: Plan, label: str, workers: tuple[str, ...] = ()) -> Engine:
    if not _output.err.is_terminal:
        return engine_cls.load(path, plan, workers=workers)
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), console=_output.err,
                  transient=True) as bar:
        task = bar.add_task(label, total=1.0)
        return engine_cls.load(path, plan, progress=lambda f: bar.update(task, completed=f), workers=workers)


def status_line(engine: Engine, summary: ModelSummary, last, context_used: int | None = None) -> str:
    """'24 tokens · 41.2 tok/s · prompt 310 tok/s · experts in RAM · ctx 512/4096' for people."""
    parts = [f"{last.completion_tokens} tokens"]
    if last.generation_tps:
        parts.append(f"{last.generation_tps:.1f} tok/s")
    if last.prompt_tps:
        parts.append(f"prompt {last.prompt_tps:.0f} tok/s")
    parts.append(f"experts in {engine.expert_location(summary.n_layer)}" if summary.is_moe else "dense model")
    if context_used is not None:
        parts.append(f"ctx {context_used}/{engine.n_ctx_seq}")
    return " · ".join(parts)


def note(message: str) -> None:
    """A dim line on stderr; the text is shown as is (rich would take "[stopped]" for markup)."""
    from rich.markup import escape

    _output.note(escape(message))


def warn(message: str) -> None:
    from rich.markup import escape

    _output.warn(escape(message))


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def for_terminal(text: str) -> str:
    """Model output with control characters removed: an ESC from a model must not drive the terminal."""
    return _CONTROL.sub("", text)


# ---- reasoning (the conversation formats) ---------------------------------------------------

_REASON = "Reasoning"
EFFORTS = ("low", "medium", "high")
ReasoningEffortOpt = Annotated[str | None, typer.Option(
    "--reasoning-effort", help="How hard a model that takes a reasoning_effort thinks (gpt-oss): low, medium or "
    "high. Default: the template's.", rich_help_panel=_REASON, show_default=False)]
ThinkOpt = Annotated[bool | None, typer.Option(
    "--think/--no-think", help="Turn thinking on or off for models whose template has a switch "
    "(enable_thinking: Qwen3, DeepSeek-V3.1, GLM). Default: the template's.", rich_help_panel=_REASON,
    show_default=False)]


def template_args(fmt, *, enable_thinking: bool | None, reasoning_effort: str | None,
                  say: bool = True) -> dict[str, object]:
    """The template variables for --think/--no-think and --reasoning-effort, given what the template
    reads (a ChatFormat); a setting the template ignores is said once (``say``) and left out."""
    if reasoning_effort is not None and reasoning_effort not in EFFORTS:
        raise UsageError(f"unknown reasoning effort {reasoning_effort!r}", "use low, medium or high")
    out: dict[str, object] = {}
    if enable_thinking is not None:
        if fmt.thinking_toggle:
            out["enable_thinking"] = enable_thinking
        elif say:
            warn("this model's chat template has no switch for thinking (enable_thinking); --think is ignored")
    if reasoning_effort is not None:
        if fmt.effort:
            out["reasoning_effort"] = reasoning_effort
        elif say:
            warn("this model's chat template takes no reasoning_effort; --reasoning-effort is ignored")
    return out


def show_template_notes(engine) -> None:
    """What the chat template needed adapting (a system role it lacks ...), each said once."""
    for text in engine.new_notes():
        note(f"({text})")
