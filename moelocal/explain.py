"""Why a plan is as fast as it is, and what would change that: the values `fit` explains itself with.

Pure, like the planner: each function takes a FitResult (or a summary and a machine) and returns frozen
values; commands/fit.py renders them and `--json` prints them. Also the choice of how many requests
`batch` runs at once, from the predicted throughput and the memory their KV caches take.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

from moelocal import planner, speed
from moelocal.errors import DoesNotFitError
from moelocal.gguf_model import ModelSummary
from moelocal.hardware import Hardware
from moelocal.plan import CPU, Plan, RunOptions
from moelocal.units import human_bytes

# The context sizes the ladder tries (up to the model's own), and the KV-cache types that would fit more.
CONTEXT_LADDER = (8192, 16384, 32768, 65536, 131072, 262144)
SMALLER_KV = ("q8_0", "q4_0")
# Sequences `batch` considers running at once, and the gain a doubling must bring to be worth its memory
# and each request's slower tokens.
PARALLEL_CHOICES = (1, 2, 4, 8, 16)
PARALLEL_MIN_GAIN = 1.10
BATCH_SHOWN = (4, 8)
# The card `fit` prices for a machine without one, to say what a GPU would bring.
SUGGESTED_GPU = "RTX 3090"


@dataclass(frozen=True)
class Bound:
    share: float  # of each token's time
    device: str  # cpu, gpu0, ... ("" for the hand-offs)
    part: str  # speed.EXPERTS, WEIGHTS, KV, LAYERS, HANDOFFS

    def text(self) -> str:
        where = "RAM" if self.device == CPU else f"{self.device.upper()} memory"
        what = {
            speed.EXPERTS: f"reading routed experts from {where}",
            speed.WEIGHTS: f"reading the other weights from {where}",
            speed.KV: f"reading the KV cache from {where}",
            speed.LAYERS: f"fixed per-layer work on the {'CPU' if self.device == CPU else self.device.upper()}",
            speed.HANDOFFS: "handing activations between devices",
        }[self.part]
        return f"{self.share:.0%} of each token's time is {what}"


@dataclass(frozen=True)
class Faster:
    """One way to go faster: what it takes, the placement it allows, and the speed there."""

    needs: str  # "+6.3 GiB of VRAM", "RAM 1.5x as fast"
    label: str
    decode_tps: float

    def text(self) -> str:
        return f"{self.needs}: ~{self.decode_tps:.3g} tok/s ({self.label})"


@dataclass(frozen=True)
class KvOption:
    kv_type: str
    saves: int  # bytes, at the plan's context
    max_ctx: int  # the largest context that fits with the plan's placement and this cache type
    flags: tuple[str, ...]


@dataclass(frozen=True)
class Explanation:
    decode_tps: float
    decode_low: float
    decode_high: float
    basis: str
    bounds: tuple[Bound, ...]  # largest share first
    faster: tuple[Faster, ...]
    n_ctx: int
    context_fits: tuple[tuple[int, bool], ...]  # the ladder: (context, fits with this placement)
    max_ctx: int
    kv_options: tuple[KvOption, ...]
    batch_tps: tuple[tuple[int, float], ...]  # (sequences at once, aggregate decode tok/s) that fit

    def to_dict(self) -> dict:
        d = asdict(self)
        d["bounds"] = [{**asdict(b), "text": b.text()} for b in self.bounds]
        d["faster"] = [{**asdict(f), "text": f.text()} for f in self.faster]
        d["context_fits"] = [{"n_ctx": c, "fits": ok} for c, ok in self.context_fits]
        d["batch_tps"] = [{"n_seq": n, "decode_tps": t} for n, t in self.batch_tps]
        return d


def bounds(summary: ModelSummary, plan: Plan, hw: Hardware, top: int = 3) -> tuple[Bound, ...]:
    """The parts of a decoded token's time, largest first (speed.decode_parts), those of 5% or more."""
    parts = speed.decode_parts(summary, plan.placement, plan.options, hw)
    total = sum(parts.values()) or 1.0
    out = sorted((Bound(v / total, dev, what) for (dev, what), v in parts.items()), key=lambda b: -b.share)
    return tuple(b for b in out[:top] if b.share >= 0.05)


def faster(result: planner.FitResult) -> tuple[Faster, ...]:
    """What would make the recommended plan faster: more VRAM for a faster placement that does not fit
    (the next step, and everything on the GPU), a common GPU where there is none, or faster RAM where
    RAM reads bound the speed."""
    best = result.best
    if best is None:
        return ()
    out: list[Faster] = []
    s, hw = result.summary, result.hardware
    quicker = [p for p in result.plans if not p.fits and not p.placement.from_disk and p.placement.devices
               and p.predicted.decode_tps > best.predicted.decode_tps * 1.05]
    quicker.sort(key=lambda p: sum(n for d, n in p.shortfall().items() if d != CPU))
    picked = quicker[:1] + [p for p in quicker[1:] if p is result.plans[0]]
    for p in picked:
        short = {d: n for d, n in p.shortfall().items() if d != CPU}
        if not short or (CPU in p.shortfall()):
            continue
        needs = " and ".join(f"+{human_bytes(n)} of VRAM" + (f" on {d.upper()}" if len(hw.gpus) > 1 else "")
                             for d, n in short.items())
        out.append(Faster(needs, p.placement.describe(s.n_layer), p.predicted.decode_tps))
    if not hw.gpus:  # what a common card would do for this model
        from moelocal.hardware import GPU, lookup_gpu

        label, bw, tf, mem = lookup_gpu(SUGGESTED_GPU)
        card = GPU(name=label, total=mem or 0, free=mem or 0, bandwidth=bw, tflops=tf)
        with_gpu = planner.fit(s, replace(hw, gpus=(card,)), best.options).best
        if with_gpu is not None and with_gpu.predicted.decode_tps > 1.2 * best.predicted.decode_tps:
            out.append(Faster(f"a {card.total / (1 << 30):.0f} GiB GPU like the {label}",
                              with_gpu.placement.describe(s.n_layer), with_gpu.predicted.decode_tps))
    parts = speed.decode_parts(s, best.placement, best.options, hw)
    total = sum(parts.values()) or 1.0
    ram = sum(v for (dev, what), v in parts.items() if dev == CPU and what not in (speed.LAYERS, speed.HANDOFFS))
    if ram / total >= 0.3:
        quick = speed.predict(s, best.placement, best.options, replace(hw, cpu_bandwidth=hw.cpu_bandwidth * 1.5))
        out.append(Faster("RAM 1.5x as fast", "same placement", quick.decode_tps))
    return tuple(out)


def max_context(summary: ModelSummary, plan: Plan, hw: Hardware, kv_type: str | None = None) -> int:
    """The largest context that fits with the plan's placement: the model's own, or a multiple of 1024."""
    options = replace(plan.options, kv_type=kv_type or plan.options.kv_type)
    if kv_type in ("q8_0", "q4_0"):
        options = replace(options, flash_attn=True)  # llama.cpp quantizes the V cache only with flash attention

    def price(n_ctx: int) -> Plan:
        return planner.make_plan(summary, plan.placement, replace(options, n_ctx=n_ctx * options.n_seq), hw)

    def fits(n_ctx: int) -> bool:
        return price(n_ctx).fits

    top = summary.context_length or plan.options.n_ctx
    at_top = price(top)
    if at_top.fits:
        return top
    lo, hi = 0, max(1, top // 1024)  # in steps of 1024 tokens: lo fits (0: nothing does), hi does not
    # Memory grows about linearly with the context (the KV cache exactly): a line through two priced
    # contexts says where it stops fitting, and two checks around that usually settle it (each check
    # rebuilds the compute graph, the costly part of a warm `fit`).
    base_ctx = max(1, plan.options.n_ctx // max(1, options.n_seq))
    base = plan if options == plan.options else price(base_ctx)
    if top > base_ctx:
        crossings = []
        for dev, m in at_top.memory.items():
            room = at_top.budget.get(dev, 0)
            m0 = base.memory.get(dev)
            grow = (m.total - m0.total) / (top - base_ctx) if m0 is not None else 0.0
            if m.total > room and grow > 0:
                crossings.append(top - (m.total - room) / grow)
        if crossings:
            guess = min(max(1, int(min(crossings)) // 1024), hi - 1)
            if guess > lo and fits(guess * 1024):
                lo = guess
                hi = guess + 1 if not fits((guess + 1) * 1024) else hi
            elif guess > lo:
                hi = guess
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid * 1024):
            lo = mid
        else:
            hi = mid
    return lo * 1024


def explain(result: planner.FitResult) -> Explanation | None:
    """Everything `fit` says about its recommendation beyond the table; None when nothing fits."""
    best = result.best
    if best is None:
        return None
    s, hw, p = result.summary, result.hardware, best.predicted
    top = max(s.context_length or best.options.n_ctx, best.options.n_ctx)
    largest = max_context(s, best, hw)
    own = s.context_length or top
    ladder = tuple((c, c <= largest) for c in sorted({*(c for c in CONTEXT_LADDER if c < own), own}))
    kv_now = sum(m.kv for m in best.memory.values())
    kv_options = []
    if best.options.kv_type in ("f16", "bf16", "f32"):
        from moelocal import memory

        for kv in SMALLER_KV:
            trial = replace(best.options, kv_type=kv, flash_attn=True)
            smaller = sum(memory.kv_bytes_by_layer(s, trial))
            flags = ("-ctk", kv, "-ctv", kv) + (() if best.options.flash_attn else ("-fa", "on"))
            kv_options.append(KvOption(kv, max(0, kv_now - smaller), max_context(s, best, hw, kv), flags))
    batch = []
    for n in BATCH_SHOWN:
        plan_n = _plan_for(s, hw, best.options, n, best)
        if plan_n is not None:
            batch.append((n, speed.throughput(s, plan_n.placement, plan_n.options, hw, n)))
    return Explanation(decode_tps=p.decode_tps, decode_low=p.decode_low, decode_high=p.decode_high, basis=p.basis,
                       bounds=bounds(s, best, hw), faster=faster(result), n_ctx=best.options.n_ctx,
                       context_fits=ladder, max_ctx=largest, kv_options=tuple(kv_options), batch_tps=tuple(batch))


def _plan_for(summary: ModelSummary, hw: Hardware, options: RunOptions, n_seq: int, like: Plan | None = None,
              **forced) -> Plan | None:
    """The plan for ``n_seq`` sequences of ``options.n_ctx // options.n_seq`` tokens each: ``like``'s placement,
    or the planner's choice (or the one ``forced`` names); None when it does not fit."""
    per_seq = max(1, options.n_ctx // max(1, options.n_seq))
    opts = replace(options, n_ctx=per_seq * n_seq, n_seq=n_seq)
    if like is not None:
        plan = planner.make_plan(summary, like.placement, opts, hw)
    else:
        try:
            plan = planner.plan_model(summary, hw, opts, **forced)
        except DoesNotFitError:
            return None
    return plan if plan.fits else None


def choose_parallel(summary: ModelSummary, hw: Hardware, options: RunOptions, n_requests: int,
                    choices: Sequence[int] = PARALLEL_CHOICES, **forced) -> int:
    """How many requests `batch` should run at once: the N whose predicted aggregate decode speed is
    highest among those whose plan (with N sequences' KV cache, ``options.n_ctx`` tokens each) fits,
    a doubling taken only when it gains PARALLEL_MIN_GAIN; never more than ``n_requests``. ``forced``:
    the placement flags (n_gpu_layers, n_cpu_moe, cpu_moe) as planner.plan_model takes them."""
    per_seq = replace(options, n_seq=1)
    best_n, best_tps = 1, 0.0
    for n in sorted(set(choices)):
        if n > max(1, n_requests):
            break
        plan = _plan_for(summary, hw, per_seq, n, **forced)
        if plan is None:
            break  # more sequences only take more memory
        tps = speed.throughput(summary, plan.placement, plan.options, hw, n)
        if n == 1 or tps >= best_tps * PARALLEL_MIN_GAIN:
            best_n, best_tps = n, tps
    return best_n
