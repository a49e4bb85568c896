"""Candidate placements, the speed model, and the choice of plan. Pure: no I/O, no environment.

The search follows how people place MoE models by hand with llama.cpp, but exhaustively:
everything on the GPU(s); the routed experts of the first N layers in host memory (``--n-cpu-moe N``)
for every N; all experts in host memory with fewer GPU layers; CPU only; and, when even that does not
fit in RAM, running from disk through mmap. Each candidate gets a memory bill per device
(memory.estimate) and a predicted speed; the fastest one that fits every device wins.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from moelocal import layout, memory, speed
from moelocal.errors import DoesNotFitError, UsageError
from moelocal.gguf_model import ModelSummary
from moelocal.hardware import Hardware
from moelocal.plan import CPU, DeviceMemory, Placement, Plan, RunOptions
from moelocal.speed import predict
from moelocal.units import human_bytes

GiB = 1 << 30
MiB = 1 << 20

# Context used when the user gives none: the model's own, capped; halved (down to MIN_AUTO_CTX)
# only when nothing fits at the larger size.
DEFAULT_CTX_CAP = 32768
MIN_AUTO_CTX = 2048
# Safety margins: a fraction of each budget left free for what nobody can predict exactly.
GPU_MARGIN = 0.05
RAM_MARGIN = 0.05
MIN_RAM_MARGIN = 256 * MiB
# The speed model lives in moelocal/speed.py; these names stay here for the code that used them.
CPU_BW_EFFICIENCY = speed.CPU_BW_EFFICIENCY
CPU_LAYER_OVERHEAD_S = speed.CPU_LAYER_OVERHEAD_S
DECODE_DEPTH = speed.DECODE_DEPTH
GPU_BW_EFFICIENCY = speed.GPU_BW_EFFICIENCY
HOP_LATENCY_S = speed.HOP_LATENCY_S
NET_HOP_LATENCY_S = speed.NET_HOP_LATENCY_S
_device_speed = speed._device_speed
_hop_seconds = speed._hop_seconds
_predict_from_disk = speed._predict_from_disk

# The rule for recommending a quantization (`fit` on several files or a repo): the highest-quality
# (most bits per weight) quantization whose best plan fits and decodes at least ACCEPTABLE_TPS
# tokens/s; if none is that fast, the fastest one that fits.
ACCEPTABLE_TPS = 8.0


@dataclass(frozen=True)
class FitResult:
    """All candidates for one model on one machine, and which one is recommended (or None)."""

    summary: ModelSummary
    hardware: Hardware
    plans: tuple[Plan, ...]
    recommended: int | None
    notes: tuple[str, ...] = ()
    # where the memory figures come from (oracle.describe): llama.cpp's dry run or moelocal's own model
    memory_source: dict | None = None
    asked: int | None = None  # the placement the user's flags asked for (fit --n-cpu-moe, -ot ...)

    @property
    def best(self) -> Plan | None:
        return self.plans[self.recommended] if self.recommended is not None else None

    def verdict(self) -> str:
        """One line: does it fit, and how."""
        best = self.best
        if best is None:
            disk = next((p for p in self.plans if p.placement.from_disk), None)
            short = _shortest(self.plans)
            parts = []
            for dev, n in short.items():
                parts.append(f"{human_bytes(n)} more {'RAM' if dev == CPU else 'VRAM on ' + dev.upper()}")
            msg = "does not fit: needs " + " and ".join(parts) if parts else "does not fit"
            if disk is not None:
                msg += f"; it could run from disk through mmap at about {disk.predicted.decode_tps:.2g} tokens/s"
            return msg
        p = best.placement
        if not p.devices or p.n_gpu_layers == 0:
            return "fits in RAM, runs on the CPU"
        moe_layers = len(self.summary.moe_layers)
        n_cpu = _cpu_expert_layers(self.summary, best)
        where = p.describe(self.summary.n_layer).removeprefix("all on ")
        if p.n_gpu_layers >= self.summary.n_layer + 1 and n_cpu == 0:
            return f"fits on the {where}"
        if p.n_gpu_layers >= self.summary.n_layer + 1:
            return f"fits with the experts of {n_cpu} of {moe_layers} layers on the CPU"
        return (
            f"fits with {p.repeating_on_gpu(self.summary.n_layer)} of {self.summary.n_layer} layers on the GPU"
            + (f" and the experts of {n_cpu} layers on the CPU" if n_cpu else "")
        )

    def to_dict(self) -> dict:
        return {
            "model": self.summary.to_dict(),
            "hardware": self.hardware.to_dict(),
            "plans": [{**p.to_dict(), "label": p.placement.describe(self.summary.n_layer), "asked": i == self.asked}
                      for i, p in enumerate(self.plans)],
            "recommended": self.recommended,
            "asked": self.asked,
            "verdict": self.verdict(),
            "notes": list(self.notes),
            "memory_source": self.memory_source,
            "llama_cpp_flags": llama_cpp_flags(self.best, self.hardware) if self.best else None,
        }


def _shortest(plans: Sequence[Plan]) -> dict[str, int]:
    """The shortfall of the in-memory candidate that misses by the least."""
    inmem = [p for p in plans if not p.placement.from_disk] or list(plans)
    if not inmem:
        return {}
    best = min(inmem, key=lambda p: sum(p.shortfall().values()))
    return best.shortfall()


def _cpu_expert_layers(summary: ModelSummary, plan: Plan) -> int:
    layers = {
        loc.tensor.layer
        for loc in layout.locate(summary, plan.placement)
        if loc.tensor.role == "routed_experts" and loc.device == CPU
    }
    return len(layers)


# ---- budgets ---------------------------------------------------------------------------------


def budgets(hw: Hardware) -> dict[str, int]:
    """Usable bytes per device after the safety margin."""
    out = {CPU: int(hw.ram_available - max(MIN_RAM_MARGIN, RAM_MARGIN * hw.ram_available))}
    for name, g in zip(hw.gpu_names, hw.gpus, strict=True):
        out[name] = int(g.free - GPU_MARGIN * g.total)
    return out


def _fits(memory: dict[str, DeviceMemory], budget: dict[str, int], hw: Hardware) -> bool:
    if any(m.total > budget.get(d, 0) for d, m in memory.items()):
        return False
    if hw.unified:  # GPU memory is carved out of the same RAM
        return sum(m.total for m in memory.values()) <= budget[CPU]
    return True


# ---- candidates ------------------------------------------------------------------------------


def unusable_gpus(hw: Hardware) -> tuple[str, ...]:
    """GPUs whose budget does not even cover what their backend takes for itself (a card that
    another program fills): naming one in the device list would only cost memory it does not have,
    so the plan leaves it out and uses the others. When no GPU is left, none is left out: plans that
    name them simply do not fit, and a placement the user forces stays as asked."""
    budget = budgets(hw)
    bad = tuple(name for name, g in zip(hw.gpu_names, hw.gpus, strict=True)
                if budget[name] <= memory.backend_overhead(g.backend))
    return bad if len(bad) < len(hw.gpus) else ()


def _gpu_devices(hw: Hardware) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """The offload devices in llama.cpp's order, and their split by free memory (when several).

    Workers' devices come first, as llama.cpp orders them itself: the output layer, last, then sits
    on a local device and the logits do not cross the network. GPUs that cannot hold anything are
    left out (unusable_gpus)."""
    skip = set(unusable_gpus(hw))
    order = sorted((i for i in range(len(hw.gpus)) if hw.gpu_names[i] not in skip),
                   key=lambda i: not hw.gpus[i].remote)
    names = hw.gpu_names
    devices = tuple(names[i] for i in order)
    split = tuple(float(max(hw.gpus[i].free, 0)) for i in order) if len(order) > 1 else ()
    return devices, split


# llama.cpp's own CPU-only figures at a set of options (oracle.py), or None where it cannot be asked
Oracle = Callable[[RunOptions], "memory.Reference | None"]


def make_plan(summary: ModelSummary, placement: Placement, options: RunOptions, hw: Hardware,
              reference: memory.Reference | None = None) -> Plan:
    """Price one placement: memory per device, predicted speed, and whether it fits."""

    backends = {name: g.backend for name, g in zip(hw.gpu_names, hw.gpus, strict=True)}  # gpu0: cuda, rpc0: rpc
    mem = memory.estimate(summary, placement, options, gpu_backend=backends or "cpu", reference=reference)
    budget = budgets(hw)
    for dev in placement.devices:
        mem.setdefault(dev, DeviceMemory())
    fits = _fits(mem, budget, hw)
    return Plan(placement=placement, options=options, memory=mem, budget=budget,
                predicted=predict(summary, placement, options, hw), fits=fits)


def balance(summary: ModelSummary, placement: Placement, hw: Hardware, options: RunOptions) -> Placement:
    """``placement`` with its layers split across several GPUs so that memory fills each in proportion
    to its budget: ``tensor_split`` becomes the number of layers each device takes, in order.

    A split by free memory alone (llama.cpp's default) ignores what each layer weighs: with
    ``--n-cpu-moe`` the first layers are light (their experts stay in RAM) and the last heavy, so the
    first GPU would be left half empty while the last one overflows. This walks the layers in
    llama.cpp's order with each layer's bytes on the GPU (weights there, its KV cache; the output
    head with the last) plus each device's fixed overhead, and finds the smallest common fill ratio
    at which every device holds its share (binary search; each cut greedy, which is optimal for
    contiguous ranges). Compute buffers are left to make_plan's full estimate.
    """
    devices = placement.devices
    if len(devices) < 2 or placement.n_gpu_layers <= 0:
        return placement
    n = summary.n_layer
    start = max(n + 1 - placement.n_gpu_layers, 0)
    located = layout.locate(summary, replace(placement, tensor_split=()))
    cost = [0] * (n + 1)  # per layer, the output head last
    for loc in located:
        if loc.device != CPU:
            layer = loc.tensor.layer
            cost[n if layer is None or layer >= n else layer] += loc.tensor.n_bytes
    for il, kv in enumerate(memory.kv_bytes_by_layer(summary, options)):
        if il < n:
            cost[il] += kv
    cost = cost[start:]
    budget = budgets(hw)
    backends = dict(zip(hw.gpu_names, (g.backend for g in hw.gpus), strict=True))
    room = [max(budget.get(d, 0), 1) for d in devices]
    fixed = [memory.backend_overhead(backends.get(d, "cuda")) for d in devices]

    def cut(ratio: float) -> list[int] | None:
        counts, j = [], 0
        for d in range(len(devices)):
            cap, load, taken = ratio * room[d] - fixed[d], 0, 0
            while j < len(cost) and (d == len(devices) - 1 or load + cost[j] <= cap):
                load += cost[j]
                j += 1
                taken += 1
            if d == len(devices) - 1 and load > cap:
                return None
            counts.append(taken)
        return counts

    lo, hi = 0.0, 1.0
    while cut(hi) is None and hi < 1e6:
        hi *= 2
    for _ in range(40):
        mid = (lo + hi) / 2
        if cut(mid) is None:
            lo = mid
        else:
            hi = mid
    counts = cut(hi) or [1] * len(devices)
    return replace(placement, tensor_split=tuple(float(c) for c in counts))


def placement_families(summary: ModelSummary, hw: Hardware) -> list[list[Placement]]:
    """Every placement worth pricing, in families ordered from most on the GPU to least.

    Within a family each step moves something off the GPUs (one more layer's experts to RAM, or
    one layer fewer on the GPU): what the GPUs hold only shrinks, and so does the speed. The
    families: all on the GPU(s) followed by ``--n-cpu-moe N`` for each N; the experts of the last N
    layers in RAM for each N; all experts in RAM with fewer GPU layers each step (dense models: fewer
    GPU layers); CPU only."""
    devices, split = _gpu_devices(hw)
    n = summary.n_layer
    if not devices:
        return [[Placement(n_gpu_layers=0)]]
    full = n + 1
    first = [Placement(n_gpu_layers=full, devices=devices, tensor_split=split)]
    fewer: list[Placement] = []
    if summary.is_moe:
        moe = summary.moe_layers
        seen = set()
        for k in range(1, n + 1):
            moved = tuple(i for i in moe if i < k)
            if not moved or moved in seen:
                continue
            seen.add(moved)
            first.append(Placement(n_gpu_layers=full, n_cpu_moe=k, tensor_overrides=layout.n_cpu_moe_overrides(k),
                                   devices=devices, tensor_split=split))
        # the experts of the last N layers in host memory instead (llama.cpp's own --fit does this; ik_llama.cpp
        # measured ~23% faster prompts at the same decode speed)
        last = []
        seen = set()
        for k in range(1, n + 1):
            moved = tuple(i for i in moe if i >= n - k)
            if not moved or moved in seen:
                continue
            seen.add(moved)
            last.append(Placement(n_gpu_layers=full, n_cpu_moe=k, devices=devices, tensor_split=split,
                                  tensor_overrides=layout.last_n_cpu_moe_overrides(k, n), experts_last=True))
        for ngl in range(n, 0, -1):  # all experts in host memory and fewer layers on the GPU
            fewer.append(Placement(n_gpu_layers=ngl, n_cpu_moe=n, tensor_overrides=layout.cpu_moe_overrides(),
                                   devices=devices, tensor_split=split))
        return [first, last, fewer, [Placement(n_gpu_layers=0)]]
    fewer = [Placement(n_gpu_layers=ngl, devices=devices, tensor_split=split) for ngl in range(n, 0, -1)]
    return [first, fewer, [Placement(n_gpu_layers=0)]]


def _gpus_hold(plan: Plan) -> bool:
    """Whether every offload device stays within its budget (RAM aside)."""
    return all(m.total <= plan.budget.get(d, 0) for d, m in plan.memory.items() if d != CPU)


def candidates(summary: ModelSummary, hw: Hardware, options: RunOptions, exhaustive: bool = False,
               oracle: Oracle | None = None) -> list[Plan]:
    """The placements priced, in family order: in each family the first whose GPUs hold it (the
    fastest of the family that can fit), the one before it, and the family's first; found by
    bisection, since the GPUs' load only shrinks along a family. ``exhaustive`` prices all of them
    (the tests compare)."""

    reference = oracle(options) if oracle else None

    def price(p: Placement) -> Plan:
        return make_plan(summary, balance(summary, p, hw, options), options, hw, reference)

    out: list[Plan] = []
    for family in placement_families(summary, hw):
        if exhaustive:
            out += [price(p) for p in family]
            continue
        priced = {0: price(family[0])}
        if not _gpus_hold(priced[0]) and len(family) > 1:
            last = len(family) - 1
            priced[last] = price(family[last])
            if _gpus_hold(priced[last]):
                lo, hi = 0, last  # lo does not hold, hi does
                while hi - lo > 1:
                    mid = (lo + hi) // 2
                    priced[mid] = price(family[mid])
                    if _gpus_hold(priced[mid]):
                        hi = mid
                    else:
                        lo = mid
                priced.setdefault(hi - 1, price(family[hi - 1]))
        out += [priced[i] for i in sorted(priced)]
    return out


def _choose(plans: Sequence[Plan]) -> int | None:
    fitting = [i for i, p in enumerate(plans) if p.fits and not p.placement.from_disk]
    if not fitting:
        return None
    return max(fitting, key=lambda i: (plans[i].predicted.decode_tps, plans[i].predicted.prefill_tps))


def default_ctx(summary: ModelSummary) -> int:
    return min(summary.context_length or 4096, DEFAULT_CTX_CAP)


def fit(summary: ModelSummary, hw: Hardware, options: RunOptions, ctx_requested: bool = True,
        oracle: Oracle | None = None, asked: Placement | None = None) -> FitResult:
    """Price every placement and pick the fastest that fits; shrink the context only if not requested.

    ``asked``: a placement the user gave (see forced_placement), priced with the same options and shown
    beside the recommendation (``FitResult.asked``)."""
    if options.n_ctx <= 0:
        raise UsageError(f"--ctx must be positive, got {options.n_ctx}")
    left_out = unusable_gpus(hw)
    notes: list[str] = [
        f"{name.upper()} has {human_bytes(g.free)} free, less than its backend needs for itself: left out of the plan"
        for name, g in zip(hw.gpu_names, hw.gpus, strict=True) if name in left_out]
    plans = candidates(summary, hw, options, oracle=oracle)
    chosen = _choose(plans)
    if chosen is None and not ctx_requested:
        ctx = options.n_ctx
        while chosen is None and ctx > MIN_AUTO_CTX:
            ctx = max(MIN_AUTO_CTX, ctx // 2)
            trial = candidates(summary, hw, replace(options, n_ctx=ctx), oracle=oracle)
            if _choose(trial) is not None:
                notes.append(f"context reduced from {options.n_ctx} to {ctx} tokens so that the model fits")
                plans, chosen = trial, _choose(trial)
    if chosen is None:
        cpu_only = next(p for p in plans if not p.placement.devices)
        disk = _from_disk(summary, cpu_only, hw)
        if disk is not None:
            plans.append(disk)
    shown = _shown(plans, chosen)
    rec = shown.index(plans[chosen]) if chosen is not None else None
    asked_at = None
    if asked is not None:
        opts = plans[0].options if plans else options  # the context the candidates were priced with
        mine = make_plan(summary, balance(summary, asked, hw, opts), opts, hw, oracle(opts) if oracle else None)
        asked_at = next((i for i, p in enumerate(shown) if p.placement == mine.placement and not p.placement.from_disk),
                        None)
        if asked_at is None:
            shown.append(mine)
            asked_at = len(shown) - 1
    return FitResult(summary=summary, hardware=hw, plans=tuple(shown), recommended=rec, notes=tuple(notes),
                     asked=asked_at)


def _from_disk(summary: ModelSummary, cpu_only: Plan, hw: Hardware) -> Plan | None:
    mem = cpu_only.memory[CPU]
    budget = cpu_only.budget[CPU]
    if mem.total - mem.weights > budget:
        return None  # not even the KV cache and buffers fit: no plan at all
    pred = _predict_from_disk(summary, mem, budget, cpu_only.predicted, hw)
    return replace(cpu_only, placement=replace(cpu_only.placement, from_disk=True), predicted=pred, fits=False,
                   notes=("weights do not fit in RAM; llama.cpp would page them in from disk through mmap",))


def _shown(plans: list[Plan], chosen: int | None) -> list[Plan]:
    """The plans worth a row: all-GPU, the chosen one, its neighbours, all-experts-on-CPU, CPU only, disk."""
    keep: list[int] = []

    def add(i: int | None) -> None:
        if i is not None and 0 <= i < len(plans) and i not in keep:
            keep.append(i)

    add(0)
    if chosen is not None:
        add(chosen - 1)
        add(chosen)
        c = plans[chosen].placement
        if c.n_cpu_moe and c.n_gpu_layers > 0:  # the same number of layers' experts, from the other end
            add(next((i for i, p in enumerate(plans) if p.placement.experts_last != c.experts_last
                      and p.placement.n_cpu_moe == c.n_cpu_moe and p.placement.n_gpu_layers == c.n_gpu_layers),
                     None))
    first_cpu_moe = next((i for i, p in enumerate(plans) if p.placement.tensor_overrides == layout.cpu_moe_overrides()),
                         None)
    add(first_cpu_moe)
    for i, p in enumerate(plans):
        if not p.placement.devices or p.placement.from_disk:
            add(i)
    return [plans[i] for i in sorted(keep)]


def plan_model(
    summary: ModelSummary,
    hw: Hardware,
    options: RunOptions,
    *,
    n_gpu_layers: int | None = None,
    n_cpu_moe: int | None = None,
    cpu_moe: bool = False,
    overrides: Sequence[tuple[str, str]] = (),
    ctx_requested: bool = True,
    oracle: Oracle | None = None,
) -> Plan:
    """The plan a run uses: the recommended one, or the one the user forced (check ``.fits``).

    Raises DoesNotFitError when no placement fits and none was forced.
    """
    forced = n_gpu_layers is not None or n_cpu_moe is not None or cpu_moe or bool(overrides)
    if not forced:
        result = fit(summary, hw, options, ctx_requested=ctx_requested, oracle=oracle)
        if result.best is None:
            raise DoesNotFitError(
                f"{summary.name} {result.verdict()}",
                "try a smaller quantization, a smaller --ctx, or --kv-type q8_0",
            )
        best = result.best
        return replace(best, notes=best.notes + result.notes)
    placement = forced_placement(summary, hw, n_gpu_layers=n_gpu_layers, n_cpu_moe=n_cpu_moe, cpu_moe=cpu_moe,
                                 overrides=overrides)
    return make_plan(summary, balance(summary, placement, hw, options), options, hw,
                     oracle(options) if oracle else None)


def forced_placement(
    summary: ModelSummary,
    hw: Hardware,
    *,
    n_gpu_layers: int | None = None,
    n_cpu_moe: int | None = None,
    cpu_moe: bool = False,
    overrides: Sequence[tuple[str, str]] = (),
) -> Placement:
    """The placement llama.cpp makes of these flags: ``-ngl`` (all layers when not given, as
    ``-ngl 999``), ``--n-cpu-moe N`` / ``--cpu-moe``, and ``-ot`` overrides ((regex, plan device)
    pairs, see layout.parse_tensor_overrides). The ``-ot`` patterns come first: llama.cpp tries the
    overrides in the order of its command line, so this is ``-ot ... --n-cpu-moe N``."""
    if n_cpu_moe is not None and n_cpu_moe < 0:
        raise UsageError(f"--n-cpu-moe must be 0 or more, got {n_cpu_moe}")
    if cpu_moe and n_cpu_moe is not None:
        raise UsageError("--cpu-moe and --n-cpu-moe contradict each other", "give one of them")
    devices, split = _gpu_devices(hw)
    n = summary.n_layer
    ngl = n + 1 if n_gpu_layers is None else min(max(0, n_gpu_layers), n + 1)  # -ngl 999: every layer
    if not devices:
        ngl = 0
    if cpu_moe:
        moe, k = layout.cpu_moe_overrides(), n
    elif n_cpu_moe:
        moe, k = layout.n_cpu_moe_overrides(min(n_cpu_moe, n)), min(n_cpu_moe, n)
    else:
        moe, k = (), 0
    user = tuple(overrides)
    # with -ngl 0, llama.cpp still lists the GPUs: tensors an override sends there go there
    on = bool(devices) and (ngl > 0 or any(d != CPU for _, d in user))
    # on the CPU alone every override is a no-op (all of it is in RAM anyway): none is applied
    return Placement(n_gpu_layers=ngl, n_cpu_moe=k if on else 0, tensor_overrides=(user + moe) if on else (),
                     devices=devices if on else (), tensor_split=split if on else ())


def recommend_quant(summaries: Sequence[ModelSummary], hw: Hardware, options: RunOptions,
                    ctx_requested: bool = True) -> int | None:
    """Index of the quantization to use (rule: see ACCEPTABLE_TPS), or None when none fits."""
    results = [fit(s, hw, options, ctx_requested=ctx_requested) for s in summaries]
    return rank_quants(summaries, results)


def rank_quants(summaries: Sequence[ModelSummary], results: Sequence[FitResult]) -> int | None:
    fitting = [i for i, r in enumerate(results) if r.best is not None]
    if not fitting:
        return None
    fast = [i for i in fitting if results[i].best.predicted.decode_tps >= ACCEPTABLE_TPS]
    if fast:
        return max(fast, key=lambda i: (summaries[i].bits_per_weight, results[i].best.predicted.decode_tps))
    return max(fitting, key=lambda i: results[i].best.predicted.decode_tps)


# ---- llama.cpp flags -------------------------------------------------------------------------


def llama_cpp_flags(plan: Plan, hw: Hardware | None = None) -> list[str]:
    """The llama-server / llama-cli flags that give the same placement."""
    p, o = plan.placement, plan.options
    flags = []
    if hw is not None and hw.workers and any(d.startswith("rpc") for d in p.devices):
        # the workers' devices, then the local GPUs, named as llama.cpp registers them for --rpc
        flags += ["--rpc", ",".join(hw.workers), "-dev", ",".join(_llama_dev(d, hw) for d in p.devices)]
    elif hw is not None and p.devices and set(p.devices) != set(hw.gpu_names):  # some GPUs left out
        flags += ["-dev", ",".join(_llama_dev(d, hw) for d in p.devices)]
    flags += ["-ngl", str(p.n_gpu_layers if p.devices else 0)]
    rest, moe = p.tensor_overrides, []
    tail = layout.n_cpu_moe_overrides(p.n_cpu_moe) if p.n_cpu_moe and not p.experts_last else ()
    if rest[-1:] == layout.cpu_moe_overrides():
        rest, moe = rest[:-1], ["--cpu-moe"]
    elif tail and rest[-len(tail):] == tail:
        rest, moe = rest[: -len(tail)], ["--n-cpu-moe", str(p.n_cpu_moe)]
    if rest:  # -ot before the --n-cpu-moe patterns: llama.cpp tries overrides in command-line order
        flags += ["-ot", ",".join(f"{pat}={_llama_buft(dev, hw)}" for pat, dev in rest)]
    flags += moe
    if len(p.devices) > 1 and p.tensor_split:
        if all(float(s).is_integer() for s in p.tensor_split):  # layers per device: exact boundaries
            flags += ["-ts", ",".join(str(int(s)) for s in p.tensor_split)]
        else:
            total = sum(p.tensor_split) or 1
            flags += ["-ts", ",".join(f"{s / total:.4f}" for s in p.tensor_split)]
    flags += ["-c", str(o.n_ctx)]
    if o.n_ubatch != 512:
        flags += ["-ub", str(o.n_ubatch)]
    if o.n_batch != 2048:
        flags += ["-b", str(o.n_batch)]
    if o.kv_type != "f16":
        flags += ["-ctk", o.kv_type, "-ctv", o.kv_type]
    flags += ["-fa", "on" if o.flash_attn else "off"]
    if o.swa_full:
        flags.append("--swa-full")
    if o.n_threads:
        flags += ["-t", str(o.n_threads)]
    if p.from_disk:
        flags.append("--mmap")
    return flags


def _llama_buft(dev: str, hw: Hardware | None) -> str:
    """A plan device as -ot names it: the device's buffer type (CPU, CUDA0, RPC0[host:port] ...)."""
    if hw is not None and dev != CPU and dev in hw.gpu_names:
        return layout.buffer_type_names(hw)[1 + hw.gpu_names.index(dev)]
    return _llama_dev(dev, hw)


def _llama_dev(dev: str, hw: Hardware | None) -> str:
    if dev == CPU:
        return "CPU"
    if dev.startswith("rpc"):
        return f"RPC{int(dev[3:])}"  # llama.cpp numbers the devices of --rpc servers in order
    idx = int(dev[3:])
    backend = hw.gpus[idx].backend if hw and idx < len(hw.gpus) else "cuda"
    return {"cuda": f"CUDA{idx}", "metal": "MTL0", "vulkan": f"Vulkan{idx}"}.get(backend, dev.upper())
