"""Every MoE architecture of the vendored llama.cpp, planned as llama.cpp itself plans it.

The architectures come from llama.cpp's sources (``llama-arch.cpp`` and the tensor loaders beside
it, see archgen.architectures), so a llama.cpp with a new MoE architecture is a new case here, not
an OOM at a user's. Each gets a header-only model learned from llama.cpp's own loader
(moelocal.archgen; the recipes are kept in tests/data/arch_recipes.json and learned again, in a
child process, for an architecture that is new or that this llama.cpp loads differently; rewrite
the file with ``python -m moelocal.archgen --all .venv/share/llama.cpp/src tests/data/arch_recipes.json``). For each,
at the corners of 2k-32k context, ubatch 128-2048, flash attention on and off, f16 and q8_0 KV and
1 and 4 sequences, what ``fit`` bills (memory.estimate with llama.cpp's dry run as the oracle) is
compared with llama.cpp's own no_alloc dry run: KV cache and recurrent state within 1%, the host
total within 2%, no KV cache at all for diffusion models; where moelocal claims to rebuild the
graph node for node (memory.compute_is_exact), its own figures must be exact too. A speculative-
decoding draft head (archgen.DRAFT_HEADS) cannot have a context alone: its weights are checked
against llama.cpp's, and its refusal, instead.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from moelocal import archgen, cli, memory, oracle
from moelocal.gguf_model import read_summary
from moelocal.plan import CPU, Placement, RunOptions
from moelocal.testmodels import SPECS, write_header_only

RECIPES = Path(__file__).parent / "data" / "arch_recipes.json"
# architectures archgen makes no model of (yet), and why: a new one here must come with its reason.
# fit still plans them only if llama.cpp's dry run of the user's real file succeeds.
KNOWN_GAPS: dict[str, str] = {}
# draft heads load alone but run only beside their target model: checked apart (weights, the refusal)
DRAFT_HEADS = archgen.DRAFT_HEADS
# (n_ctx, n_ubatch, flash_attn, kv_type, n_seq): the corners of the grid; q8_0 V needs flash attention
SETTINGS = [
    (2048, 128, True, "f16", 1),
    (32768, 2048, False, "f16", 1),
    (8192, 512, True, "q8_0", 4),
    (16384, 1024, False, "f16", 4),
]
DIFFUSION = {"llada-moe", "rnd1", "dream", "llada"}  # llm_arch_is_diffusion: no KV cache


@pytest.fixture(scope="module")
def moe_archs(llama_assets) -> list[str]:
    archs = archgen.moe_architectures(llama_assets / "src")
    assert {"qwen3moe", "deepseek2", "gpt-oss", "llada-moe", "qwen3vlmoe"} <= set(archs)
    return archs


@pytest.fixture(scope="module")
def arch_models(moe_archs, tmp_path_factory) -> dict[str, Path | str]:
    """arch -> a loadable header-only model of it, or why none could be made. Architectures with a
    hand-made test model (testmodels.SPECS) get that one's shape; the others a learned one."""
    tmp = tmp_path_factory.mktemp("archs")
    stored = json.loads(RECIPES.read_text()) if RECIPES.is_file() else {}
    by_hand = {s.arch: s for s in SPECS.values() if s.is_moe}
    out: dict[str, Path | str] = {}
    for arch in moe_archs:
        path = tmp / f"{arch}.gguf"
        if arch in by_hand:
            out[arch] = write_header_only(by_hand[arch], path)
            continue
        d = stored.get(arch)
        if d and "error" in d and arch in KNOWN_GAPS:
            out[arch] = d["error"]
            continue
        if d and "error" not in d:
            archgen.write(archgen.Recipe.from_json(d), path)
            if archgen.try_load(path) is None:
                out[arch] = path
                continue
        d = archgen.learn_isolated(arch)  # new, or loaded differently by this llama.cpp
        if "error" in d:
            out[arch] = d["error"]
            continue
        out[arch] = archgen.write(archgen.Recipe.from_json(d), path)
    return out


def test_every_moe_architecture_has_a_model(arch_models):
    missing = {a: why for a, why in arch_models.items() if isinstance(why, str) and a not in KNOWN_GAPS}
    assert not missing, "no model could be made of these architectures (fix archgen.ARCH_KEYS, or add them " \
                        f"to KNOWN_GAPS with the reason): {missing}"
    still_gaps = [a for a in KNOWN_GAPS if isinstance(arch_models.get(a), Path)]
    assert not still_gaps, f"these load now, take them out of KNOWN_GAPS: {still_gaps}"


def _options(n_ctx: int, n_ubatch: int, fa: bool, kv: str, n_seq: int) -> RunOptions:
    return RunOptions(n_ctx=n_ctx, n_ubatch=n_ubatch, n_batch=max(2048, n_ubatch), flash_attn=fa, kv_type=kv,
                      n_seq=n_seq)


def _host(m) -> int:
    return m.weights + m.kv + m.compute + m.output


@pytest.fixture(scope="module")
def dry_runs(arch_models) -> dict[tuple[str, tuple], dict]:
    """llama.cpp's answer for every (architecture, setting), from child processes: an abort in
    llama.cpp is that case's answer, not the end of the test session."""
    work = [(f"{arch}|{i}", str(path), _options(*setting)) for arch, path in sorted(arch_models.items())
            if isinstance(path, Path) for i, setting in enumerate(SETTINGS)]
    answers = dict(oracle._run(work, child=True))
    return {(k.split("|")[0], SETTINGS[int(k.split("|")[1])]): v for k, v in answers.items()}


def test_fit_bills_what_llama_cpp_allocates_for_every_moe_architecture(arch_models, dry_runs, capsys, request):
    verbose = request.config.getoption("verbose") > 0
    failures, rows = [], []
    worst = (0.0, "", None)
    for arch, path in sorted(arch_models.items()):
        if not isinstance(path, Path) or arch in KNOWN_GAPS or arch in DRAFT_HEADS:
            continue
        summary = read_summary(path)
        exact = memory.compute_is_exact(summary)
        own_worst = 0.0
        for setting in SETTINGS:
            o = _options(*setting)
            answer = dry_runs[(arch, setting)]
            if answer and answer.get("stage") == "context" and setting[3] != "f16" and "quantized V" in answer["error"]:
                continue  # an architecture without flash attention refuses a quantized V cache: so does fit
            if answer is None or "error" in answer:
                failures.append(f"{arch} {setting}: llama.cpp: {answer and answer['error']}")
                continue
            real = memory.DeviceMemory(**{k: answer[k] for k in ("weights", "kv", "compute", "output")})
            ref = memory.Reference(**{k: answer[k] for k in ("weights", "kv", "compute", "output")})
            est = memory.estimate(summary, Placement(), o, reference=ref)[CPU]
            own = memory.estimate(summary, Placement(), o)[CPU]
            host_err = (_host(est) - _host(real)) / _host(real)
            kv_err = (est.kv - real.kv) / real.kv if real.kv else float(est.kv != 0)
            if abs(host_err) > abs(worst[0]):
                worst = (host_err, arch, setting)
            own_worst = max(own_worst, abs(_host(own) - _host(real)) / _host(real))
            if abs(kv_err) > 0.01 or abs(host_err) > 0.02:
                failures.append(f"{arch} {setting}: KV {est.kv} vs {real.kv}, host {_host(est)} vs {_host(real)}")
            if arch in DIFFUSION and (real.kv or est.kv):
                failures.append(f"{arch} {setting}: a diffusion model has no KV cache, billed {est.kv}")
            if exact and (own.kv, own.compute) != (real.kv, real.compute):
                failures.append(f"{arch} {setting}: moelocal claims an exact rebuild, but its own KV/compute "
                                f"{own.kv}/{own.compute} are not llama.cpp's {real.kv}/{real.compute}")
        rows.append(f"{arch:16} {'exact' if exact else 'oracle':6} own model worst {100 * own_worst:7.2f}%")
    with capsys.disabled():
        print(f"\n{len(rows)} MoE architectures; worst host total vs llama.cpp: {100 * worst[0]:+.3f}% "
              f"({worst[1]} at {worst[2]})")
        if verbose:
            print("\n".join(rows))
    assert not failures, "\n".join(failures)
    drafts = [a for a in arch_models if a in DRAFT_HEADS]
    assert len(rows) == len(arch_models) - len(KNOWN_GAPS) - len(drafts) >= 66


def test_a_draft_head_is_billed_its_weights_and_refused_a_context_of_its_own(arch_models, dry_runs, capsys):
    """A speculative-decoding draft head (dflash) loads alone, with the weights moelocal bills, but
    llama.cpp makes a context of it only beside its target model's: its dry run alone fails, at every
    setting, and so does `fit`, in one line, with no plan."""
    drafts = [a for a in arch_models if a in DRAFT_HEADS]
    assert drafts == ["dflash"]
    for arch in drafts:
        path = arch_models[arch]
        assert isinstance(path, Path), path
        summary = read_summary(path)
        o = _options(*SETTINGS[0])
        assert archgen.model_size(path) == memory.estimate(summary, Placement(), o)[CPU].weights > 0
        for setting in SETTINGS:
            answer = dry_runs[(arch, setting)]
            assert answer["stage"] == "context", answer
            assert f"{arch} requires ctx_other to be set" in answer["error"]
        code, out = _fit(capsys, str(path), "--ctx", "4096")
        lines = out.strip().splitlines()
        assert code == 2 and len(lines) == 1, out
        assert lines[0].startswith(f"Error: llama.cpp (llama-cpp-python {oracle.llama_cpp_version()}) cannot run "
                                   f"{arch}.gguf (architecture {arch}): failed to initialize the context: "
                                   f"{arch} requires ctx_other to be set"), lines[0]
        assert "verdict" not in out


# ---- what llama.cpp cannot load: one line, exit code 2, no plan --------------------------------


@pytest.fixture(scope="module")
def qwen3moe_recipe(arch_models) -> archgen.Recipe:
    d = json.loads(RECIPES.read_text())["qwen3moe"]
    return archgen.Recipe.from_json(d)


def _fit(capsys, *args: str) -> tuple[int, str]:
    """`moelocal fit ARGS` for a CPU with 64 GiB of RAM: (exit code, stdout + stderr)."""
    try:
        cli.main(["fit", *args, "--no-gpu", "--ram", "64GiB"])
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    out, err = capsys.readouterr()
    return code, out + err


def test_an_unknown_architecture_is_refused_naming_it_and_the_llama_cpp_version(qwen3moe_recipe, tmp_path, capsys):
    r = qwen3moe_recipe
    bad = archgen.Recipe("notanarch", {k.replace("qwen3moe.", "notanarch."): v for k, v in r.metadata.items()},
                         dict(r.tensors))
    code, out = _fit(capsys, str(archgen.write(bad, tmp_path / "notanarch.gguf")))
    assert code == 2
    assert out.strip().splitlines() == [
        f"Error: llama.cpp (llama-cpp-python {oracle.llama_cpp_version()}) cannot load notanarch.gguf (architecture "
        "notanarch): unknown model architecture: 'notanarch' (moelocal plans only what its llama.cpp can run; "
        "a newer llama-cpp-python may know it)"]


def test_a_missing_tensor_a_wrong_shape_and_a_bad_vocabulary_are_refused(qwen3moe_recipe, tmp_path, capsys):
    r = qwen3moe_recipe
    missing = archgen.Recipe("qwen3moe", dict(r.metadata),
                             {k: v for k, v in r.tensors.items() if k != "blk.2.ffn_up_exps.weight"})
    wrong = archgen.Recipe("qwen3moe", dict(r.metadata), {**r.tensors, "blk.1.attn_q.weight": ((256, 128), 8)})
    vocab = archgen.Recipe("qwen3moe", {**r.metadata, "tokenizer.ggml.model": ("str", "nonsense")}, dict(r.tensors))
    for recipe, name, why in [
        (missing, "missing", "tensor 'blk.2.ffn_up_exps.weight' not found"),
        (wrong, "wrong", "tensor 'blk.1.attn_q.weight' has wrong shape; expected 256, 256, got 256, 128, 1, 1"),
        (vocab, "vocab", "unknown tokenizer: 'nonsense'"),
    ]:
        code, out = _fit(capsys, str(archgen.write(recipe, tmp_path / f"{name}.gguf")))
        lines = out.strip().splitlines()
        assert code == 2 and len(lines) == 1, out
        assert lines[0].startswith(f"Error: llama.cpp (llama-cpp-python {oracle.llama_cpp_version()}) cannot load "
                                   f"{name}.gguf (architecture qwen3moe): "), lines[0]
        assert why in lines[0]
        assert "verdict" not in out


def test_fit_says_where_its_figures_come_from(arch_models, capsys):
    """An architecture moelocal rebuilds is billed by its own model, checked by llama.cpp; another
    one by llama.cpp's dry run; --json says which."""
    for arch, source, text in [
        ("qwen3moe", "moelocal", "memory source: moelocal's model (exact for this architecture: llama.cpp's dry run "
                                 "agrees)"),
        ("llada-moe", "llama.cpp", "memory source: llama.cpp dry run (llada-moe not rebuilt by moelocal)\n"),
    ]:
        path = str(arch_models[arch])
        code, out = _fit(capsys, path, "--ctx", "4096")
        assert code == 0, out
        assert text in out
        code, out = _fit(capsys, path, "--ctx", "4096", "--json")
        d = json.loads(out)
        assert d["memory_source"]["source"] == source
        assert d["memory_source"]["llama_cpp"] == oracle.llama_cpp_version()
        if arch == "llada-moe":  # a diffusion model: no KV cache, as llama.cpp says
            assert d["plans"][-1]["memory"]["cpu"]["kv"] == 0


def test_a_second_fit_asks_llama_cpp_nothing(arch_models, monkeypatch):
    path = arch_models["qwen3vlmoe"]
    summary = read_summary(path)
    o = _options(4096, 512, True, "f16", 1)
    first = oracle.reference(summary, o)
    monkeypatch.setattr(oracle, "_run", lambda work: pytest.fail("llama.cpp was asked again"))
    assert oracle.reference(read_summary(path), o) == first
    other = _options(8192, 512, True, "f16", 1)
    with pytest.raises(pytest.fail.Exception):
        oracle.reference(summary, other)  # new options: a new question


# ---- split over devices: llama.cpp's CPU figures spread by moelocal's model --------------------

from test_memory import worker  # noqa: E402,F401  the loopback RPC worker: a real second device

from moelocal import layout  # noqa: E402
from moelocal.measure import measure  # noqa: E402

SPLIT_ARCHS = ("llada-moe", "nemotron_h_moe", "cohere2moe", "qwen3vlmoe", "granitemoe", "minimax-01", "jamba",
               "gemma4", "exaone-moe", "grok")


def test_split_over_devices_never_bills_less_than_llama_cpp(arch_models, worker, capsys):  # noqa: F811
    """Where moelocal does not rebuild an architecture, a plan over several devices bills llama.cpp's
    CPU-only KV cache spread over the layers by moelocal's per-layer model, and moelocal's compute
    buffers plus what they fall short of llama.cpp's on every device that runs layers. Against
    llama.cpp's own figures per device (a loopback RPC worker as the second device): the KV cache of
    each device is llama.cpp's, and no device is billed less than llama.cpp allocates there."""
    o = _options(4096, 512, True, "f16", 1)
    worst = 0.0
    for arch in SPLIT_ARCHS:
        path = arch_models[arch]
        summary = read_summary(path)
        n = summary.n_layer
        ref = oracle.reference(summary, o)
        for placement in (Placement(n_gpu_layers=n + 1, devices=("rpc0",)),
                          Placement(n_gpu_layers=n + 1, n_cpu_moe=2, tensor_overrides=layout.n_cpu_moe_overrides(2),
                                    devices=("rpc0",)),
                          Placement(n_gpu_layers=2, devices=("rpc0",))):
            real = measure(path, placement, o, named=worker)
            est = memory.estimate(summary, placement, o, gpu_backend="rpc", reference=ref)
            for dev in (CPU, "rpc0"):
                assert est[dev].kv == real[dev].kv, (arch, placement, dev)  # per layer, from llama.cpp's log
                billed, held = est[dev].kv + est[dev].compute, real[dev].kv + real[dev].compute
                assert billed >= held, (arch, placement, dev, est[dev], real[dev])
                assert abs(est[dev].weights - real[dev].weights) <= 0.02 * max(real[dev].weights, 1) + 64 * 1024
                if held:
                    worst = max(worst, (billed - held) / held)
    with capsys.disabled():
        print(f"\nsplit plans of {len(SPLIT_ARCHS)} architectures: KV + compute over-billed by at most "
              f"{100 * worst:.1f}% per device")


def test_a_hub_header_alone_is_asked_as_a_sparse_file(arch_models, monkeypatch):
    """A model planned from the Hub has only its header (a prefix the range requests fetched): the
    oracle writes it before a hole and asks llama.cpp, in a child process as `fit` does."""
    from moelocal.gguf_model import parse_header, summarize

    path = arch_models["qwen3vlmoe"]
    data = path.read_bytes()
    header = parse_header(data[: parse_header(data).data_offset], complete=False)
    summary = summarize([header], ["org/repo/qwen3vlmoe-Q8_0.gguf"], path.stat().st_size)
    assert summary.sources[0].path is None and summary.sources[0].raw is not None
    o = _options(8192, 512, True, "f16", 1)
    monkeypatch.delitem(sys.modules, "llama_cpp", raising=False)  # as in `fit`: llama.cpp not loaded here
    ref = oracle.reference(summary, o)
    monkeypatch.undo()
    real = measure(path, Placement(), o)[CPU]
    assert ref is not None and (ref.weights, ref.kv, ref.compute) == (real.weights, real.kv, real.compute)
    assert sum(ref.kv_layers) == ref.kv and len(ref.kv_layers) == summary.n_layer
