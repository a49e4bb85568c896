"""The engine on real llama.cpp: plans applied (overrides, buffers), sampling, templates, sequences."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading

import pytest

from moelocal import layout, native
from moelocal.engine import (
    CHATML_TEMPLATE,
    Deviation,
    Engine,
    SamplingParams,
    compare_memory,
    extra_bufts_default,
    fit_messages,
    measured_memory,
    render_template,
)
from moelocal.errors import EngineError, UsageError
from moelocal.gguf_model import read_summary
from moelocal.plan import DeviceMemory, Placement, Plan, Prediction, RunOptions

MiB = 1 << 20
EXPS = ("ffn_gate_exps", "ffn_down_exps", "ffn_up_exps")
PROMPT = "The router scores all of the experts and keeps the best two."


def cpu_plan(placement: Placement | None = None, *, n_ctx: int = 256, n_seq: int = 1,
             memory: dict | None = None, **options) -> Plan:
    options = RunOptions(n_ctx=n_ctx, n_seq=n_seq, n_threads=1, **options)
    return Plan(placement=placement or Placement(), options=options, memory=memory or {}, budget={},
                predicted=Prediction(0, 0), fits=True)


def text_of(chunks) -> str:
    return "".join(c.text for c in chunks)


@pytest.fixture(scope="module")
def qwen(models):
    with Engine.load(models["qwen3moe-q8_0"], cpu_plan(n_ctx=512)) as engine:
        yield engine


# ---- loading with a plan ---------------------------------------------------------------------


def test_expert_overrides_are_applied_layer_by_layer(models):
    plan = cpu_plan(Placement(n_cpu_moe=2, tensor_overrides=layout.n_cpu_moe_overrides(2)))
    with Engine.load(models["qwen3moe-q8_0"], plan) as e:
        assert sorted(e.overridden) == sorted((f"blk.{il}.{t}.weight", "CPU") for il in (0, 1) for t in EXPS)
    # deepseek2's layer 0 is dense: --n-cpu-moe 2 moves the experts of layer 1 only, as in llama.cpp
    with Engine.load(models["deepseek2-q8_0"], plan) as e:
        assert sorted(e.overridden) == sorted((f"blk.1.{t}.weight", "CPU") for t in EXPS)
    with Engine.load(models["qwen3moe-q8_0"], cpu_plan(Placement(tensor_overrides=layout.cpu_moe_overrides()))) as e:
        assert len(e.overridden) == 4 * 3
        assert {buft for _, buft in e.overridden} == {"CPU"}


def test_buffer_report_matches_the_model_and_the_kv_cache(models):
    path = models["qwen3moe-q8_0"]
    summary = read_summary(path)
    with Engine.load(path, cpu_plan(n_ctx=256)) as e:
        kinds = {(b.name, b.kind) for b in e.report.buffers}
        assert ("CPU", "kv") in kinds and ("CPU", "compute") in kinds
        mem = e.memory
        assert set(mem) == {"cpu"}
        # the log rounds to 0.01 MiB; tensors are aligned to 32 bytes in the file
        assert abs(mem["cpu"].weights - summary.tensor_bytes) <= 0.005 * MiB + 32 * len(summary.tensors)
        # f16 K and V: 4 layers x 2 KV heads x (64 + 64) x 2 bytes x 256 cells = 0.50 MiB exactly
        assert mem["cpu"].kv == 4 * 2 * 128 * 2 * 256
        right = {"cpu": DeviceMemory(weights=summary.tensor_bytes, kv=mem["cpu"].kv, compute=mem["cpu"].compute)}
        assert e.plan.memory == {} and compare_memory(right, mem, slack=0) == []
        wrong = {"cpu": DeviceMemory(weights=2 * summary.tensor_bytes, kv=mem["cpu"].kv,
                                     compute=mem["cpu"].compute)}
        assert compare_memory(wrong, mem, slack=0) == [
            Deviation("cpu", wrong["cpu"].total, mem["cpu"].total)
        ]


def test_a_plan_for_a_gpu_that_is_not_there_is_refused(models):
    if native.gpu_devices():
        pytest.skip("this llama.cpp has a GPU")
    plan = cpu_plan(Placement(n_gpu_layers=5, devices=("gpu0",)))
    with pytest.raises(EngineError) as err:
        Engine.load(models["qwen3moe-q8_0"], plan)
    assert err.value.message == "the plan puts tensors on gpu0, but llama.cpp sees 0 GPU(s) (none)"


def test_a_broken_file_is_one_engine_error(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\x00" * 40)
    with pytest.raises(EngineError) as err:
        Engine.load(bad, cpu_plan())
    assert err.value.message.startswith("llama.cpp could not load bad.gguf: ")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("key", ["qwen3moe-q8_0", "qwen3moe-q4_k", "gpt-oss-q4_k"])
def test_quantized_model_with_a_long_prompt_does_not_crash_by_default(models, key):
    """The AMX trap: quantized weights in llama.cpp's AMX buffer type crash on batches of 2+ tokens.
    In a child process, so a crash fails this test instead of killing pytest."""
    code = textwrap.dedent(f"""
        from moelocal.engine import Engine, SamplingParams
        from moelocal.plan import Placement, Plan, Prediction, RunOptions
        plan = Plan(Placement(), RunOptions(n_ctx=256, n_threads=1), {{}}, {{}}, Prediction(0, 0), True)
        with Engine.load({str(models[key])!r}, plan) as e:
            names = {{b.name for b in e.report.buffers}}
            last = list(e.generate({PROMPT!r} * 3, SamplingParams(seed=1, max_tokens=8, ignore_eos=True)))[-1]
            print(e.extra_bufts, "AMX" in names, last.prompt_tokens > 30, last.completion_tokens)
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr[-2000:]
    amx = "AMX" in native.cpu_extra_buffer_types()
    assert run.stdout.strip() == f"{not amx} False True 8"


def test_extra_buffer_types_default_off_only_where_amx_is():
    assert extra_bufts_default(["AMX", "CPU_REPACK"]) is False
    assert extra_bufts_default(["CPU_REPACK"]) is True
    assert extra_bufts_default([]) is True


def test_extra_buffer_types_repack_weights_only_when_on(models):
    if "CPU_REPACK" not in native.cpu_extra_buffer_types() or "AMX" in native.cpu_extra_buffer_types():
        pytest.skip("no CPU_REPACK buffer type here (or AMX, which would crash)")
    path = models["qwen3moe-q4_k"]
    tensor_bytes = read_summary(path).tensor_bytes
    with Engine.load(path, cpu_plan(), extra_bufts=False) as e:
        assert {b.name for b in e.report.buffers if b.kind == "model"} == {"CPU_Mapped"}
    with Engine.load(path, cpu_plan()) as e:  # the default here: on, and read without mmap
        assert e.extra_bufts
        assert {b.name for b in e.report.buffers if b.kind == "model"} == {"CPU", "CPU_REPACK"}
        # each weight held once: what the plan counts
        assert abs(e.memory["cpu"].weights - tensor_bytes) <= 0.01 * MiB + 32 * len(read_summary(path).tensors)


# ---- sampling and the stream -----------------------------------------------------------------


def test_same_seed_same_text_and_another_seed_differs(qwen):
    params = SamplingParams(seed=7, max_tokens=24, ignore_eos=True)
    a, b = list(qwen.generate(PROMPT, params)), list(qwen.generate(PROMPT, params))
    c = list(qwen.generate(PROMPT, SamplingParams(seed=8, max_tokens=24, ignore_eos=True)))
    assert text_of(a) == text_of(b) != text_of(c)
    last = a[-1]
    assert (last.completion_tokens, last.finish_reason, last.seed) == (24, "length", 7)
    assert [x.finish_reason for x in a[:-1]] == [None] * (len(a) - 1)
    assert last.prompt_tokens == len(qwen.tokenize(PROMPT))
    assert last.prompt_seconds > 0 and last.generation_seconds > 0


def test_greedy_ignores_the_seed(qwen):
    g1 = text_of(qwen.generate(PROMPT, SamplingParams(temperature=0, seed=1, max_tokens=16, ignore_eos=True)))
    g2 = text_of(qwen.generate(PROMPT, SamplingParams(temperature=0, seed=2, max_tokens=16, ignore_eos=True)))
    assert g1 == g2


def test_stop_string_ends_the_text_before_it(qwen):
    params = SamplingParams(seed=3, max_tokens=40, ignore_eos=True)
    full = text_of(qwen.generate(PROMPT, params))
    stop = next(full[i : i + 2] for i in range(8, len(full) - 2) if full[i : i + 2].isprintable())
    chunks = list(qwen.generate(PROMPT, SamplingParams(seed=3, max_tokens=40, ignore_eos=True, stop=(stop,))))
    assert text_of(chunks) == full[: full.index(stop)]
    assert chunks[-1].finish_reason == "stop"


def test_generation_stops_when_the_context_is_full(models):
    with Engine.load(models["qwen3moe-q8_0"], cpu_plan(n_ctx=256)) as e:
        prompt = e.tokenize(PROMPT)
        last = list(e.generate(prompt, SamplingParams(seed=1, max_tokens=10_000, ignore_eos=True)))[-1]
        assert e.n_ctx_seq == 256
        # every cell holds a token; the last one sampled is returned without being decoded
        assert (last.completion_tokens, last.finish_reason) == (256 - len(prompt) + 1, "length")
        with pytest.raises(UsageError) as err:
            e.generate(prompt * 40)
        assert err.value.message == f"the prompt has {len(prompt) * 40} tokens; the context holds 256"


def test_a_longer_prompt_reuses_the_cache_and_gives_the_same_text(qwen):
    params = SamplingParams(seed=11, max_tokens=8, ignore_eos=True)
    first = qwen.tokenize(PROMPT)
    qwen.reset()
    list(qwen.generate(first, params))
    follow = first + qwen.tokenize(" And then?", add_special=False)
    warm = list(qwen.generate(follow, params))
    assert warm[-1].cached_tokens == len(first)
    qwen.reset()
    cold = list(qwen.generate(follow, params))
    assert cold[-1].cached_tokens == 0
    assert text_of(warm) == text_of(cold)


@pytest.mark.parametrize("arch", ["qwen35moe", "qwen3next"])
def test_a_hybrid_rolls_back_to_its_checkpoint_and_gives_the_same_text(models, arch):
    """Recurrent layers cannot drop the tokens generated after a prompt; the engine restores their
    state as it was at the end of that prompt, and the text is what a fresh run gives."""
    params = SamplingParams(seed=11, max_tokens=8, ignore_eos=True)
    with Engine.load(models[f"{arch}-q8_0"], cpu_plan(n_ctx=512)) as engine:
        first = engine.tokenize(PROMPT)
        list(engine.generate(first, params))  # the cache now holds the prompt and 7 answer tokens
        follow = first + engine.tokenize(" And then?", add_special=False)  # not the answer: roll back
        warm = list(engine.generate(follow, params))
        assert warm[-1].cached_tokens == len(first)
        again = list(engine.generate(follow + engine.tokenize(" Why?", add_special=False), params))
        assert again[-1].cached_tokens == len(follow)  # the checkpoint moved to the last prompt
        engine.reset()
        cold = list(engine.generate(follow, params))
        assert cold[-1].cached_tokens == 0
    assert text_of(warm) == text_of(cold)


def test_ctrl_c_stops_a_long_prompt_inside_llama_decode(models):
    """Ctrl-C during a prompt aborts the llama_decode call under way (llama.cpp's abort callback)
    instead of waiting for it to finish, and the engine goes on working afterwards."""
    with Engine.load(models["qwen3moe-q8_0"], cpu_plan(n_ctx=8192)) as engine:
        decode = engine._decode
        codes: list[int] = []

        def recording(ctx, batch):
            if not codes:  # Ctrl-C 50 ms into the first 2,048-token chunk (which takes far longer)
                threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGINT)).start()
            codes.append(decode(ctx, batch))
            return codes[-1]

        engine._decode = recording
        tokens = engine.tokenize(PROMPT * 300)
        assert len(tokens) > 2 * engine.n_batch
        with pytest.raises(KeyboardInterrupt):
            list(engine.generate(tokens, SamplingParams(max_tokens=2)))
        assert codes == [2]  # llama_decode returned "aborted" from the first chunk
        engine._decode = decode
        params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
        after = text_of(engine.generate(PROMPT, params))
        engine.reset()
        assert after == text_of(engine.generate(PROMPT, params))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_sampling_params_are_checked():
    with pytest.raises(UsageError, match=r"top_p must be in \(0, 1\], got 1.5"):
        SamplingParams(top_p=1.5).check()
    with pytest.raises(UsageError, match="max_tokens must be at least 1, got 0"):
        SamplingParams(max_tokens=0).check()


# ---- many sequences --------------------------------------------------------------------------


def test_parallel_sequences_give_each_request_the_text_it_gets_alone(models):
    path = models["qwen3moe-q8_0"]
    requests = [(f"Request {i}: " + PROMPT[: 10 + 7 * i],
                 SamplingParams(seed=100 + i, max_tokens=12 + i, ignore_eos=True)) for i in range(5)]
    requests.insert(2, ("", SamplingParams()))  # a bad request: an error record, the others go on
    with Engine.load(path, cpu_plan(n_ctx=256)) as e:
        alone = {i: text_of(e.generate(p, s)) for i, (p, s) in enumerate(requests) if p}
    with Engine.load(path, cpu_plan(n_ctx=3 * 256, n_seq=3)) as e:
        assert e.n_seq_max == 3 and e.n_ctx_seq == 256
        texts: dict[int, str] = {}
        finished = {}
        for c in e.generate_many(requests, parallel=3):
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.done:
                finished[c.index] = c
    assert finished[2].finish_reason == "error" and texts.pop(2) == "the prompt is empty"
    assert texts == alone
    assert {i: (c.completion_tokens, c.finish_reason) for i, c in finished.items() if i != 2} == {
        i: (s.max_tokens, "length") for i, (p, s) in enumerate(requests) if p
    }


def test_one_request_can_be_cancelled_and_the_source_can_say_nothing_yet(qwen):
    params = SamplingParams(seed=5, max_tokens=20, ignore_eos=True)
    seen: dict[int, int] = {}

    def source():
        yield PROMPT, params
        yield None  # nothing new yet: the first request runs on
        yield "Another prompt", params, lambda: seen.get(1, 0) >= 3

    finished = {}
    for c in qwen.generate_many(source()):
        seen[c.index] = c.completion_tokens
        if c.done:
            finished[c.index] = (c.completion_tokens, c.finish_reason)
    assert finished == {0: (20, "length"), 1: (3, "cancelled")}


# ---- chat templates and history --------------------------------------------------------------


def test_chatml_renders_exactly():
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert render_template(CHATML_TEMPLATE, msgs) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_the_models_own_template_is_used_and_tokenized_with_specials(qwen):
    msgs = [{"role": "user", "content": "Hi"}]
    assert qwen.has_own_template
    assert qwen.render_chat(msgs) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    tokens = qwen.chat_tokens(msgs)
    assert tokens[0] == qwen.tokenize("<|im_start|>")[0]
    assert len(tokens) < len(qwen.render_chat(msgs))  # special tokens are single tokens


def test_templates_run_sandboxed():
    with pytest.raises(EngineError, match="the model's chat template failed: .*"):
        render_template("{{ messages.append(1) }}", [])
    with pytest.raises(EngineError, match="the model's chat template failed: no system role"):
        render_template("{{ raise_exception('no system role') }}", [])


def test_oldest_turns_are_dropped_but_not_the_system_message():
    msgs = [{"role": "system", "content": "s" * 5}]
    for i in range(3):
        msgs += [{"role": "user", "content": f"u{i}" * 5}, {"role": "assistant", "content": f"a{i}" * 5}]
    msgs.append({"role": "user", "content": "now"})

    def count(m):
        return sum(len(x["content"]) for x in m)

    kept, dropped = fit_messages(msgs, count, limit=30)
    assert dropped == 4
    assert [m["content"] for m in kept] == ["sssss", "u2" * 5, "a2" * 5, "now"]
    kept, dropped = fit_messages(msgs, count, limit=1)
    assert [m["content"] for m in kept] == ["sssss", "now"] and dropped == 6


# ---- reading llama.cpp's report --------------------------------------------------------------

LOG = [
    "tensor blk.0.ffn_up_exps.weight (64 MiB q4_K) buffer type overridden to CUDA_Host",
    "load_tensors:        CUDA0 model buffer size =  1024.00 MiB",
    "load_tensors:    CUDA_Host model buffer size =   512.50 MiB",
    "load_tensors:   CPU_Mapped model buffer size =   100.00 MiB",
    "llama_context:  CUDA_Host  output buffer size =     0.58 MiB",
    "llama_kv_cache:        CUDA0 KV buffer size =   256.00 MiB",
    "sched_reserve:      CUDA0 compute buffer size =   300.25 MiB",
    "sched_reserve:  CUDA_Host compute buffer size =    20.00 MiB",
]


def test_buffer_report_is_read_into_plan_devices():
    report = native.parse_buffer_report(LOG)
    assert report.overridden == (("blk.0.ffn_up_exps.weight", "CUDA_Host"),)
    mem = measured_memory(report, {"CUDA0": "gpu0", "CUDA_Host": "cpu"})
    assert mem == {
        "gpu0": DeviceMemory(weights=1024 * MiB, kv=256 * MiB, compute=round(300.25 * MiB)),
        "cpu": DeviceMemory(weights=round(612.5 * MiB), output=round(0.58 * MiB), compute=20 * MiB),
    }


def test_where_the_experts_live_reads_the_plan_and_the_log():
    e = Engine()
    e.plan = cpu_plan(Placement(n_gpu_layers=3, devices=("gpu0",)))
    e.report = native.BufferReport(overridden=(("blk.3.ffn_up_exps.weight", "CPU"),))
    assert e.expert_location(4) == "RAM (3 of 4 layers) + GPU"  # layers 0 and 1 stay on the CPU with -ngl 3
    e.plan = cpu_plan(Placement(n_gpu_layers=5, devices=("gpu0",)))
    assert e.expert_location(4) == "RAM (1 of 4 layers) + GPU"
    e.report = native.BufferReport()
    assert e.expert_location(4) == "GPU"
    e.plan = cpu_plan()
    assert e.expert_location(4) == "RAM (CPU only)"


@pytest.mark.parametrize("swa_full", [False, True])
def test_sliding_window_layers_cache_what_the_plan_says(models, swa_full):
    """gpt-oss alternates sliding-window and full layers: by default (as llama-server) the window
    layers cache only the window plus a batch; the engine applies the plan's choice exactly."""
    from moelocal import hardware, planner

    path = models["gpt-oss-q8_0"]
    summary = read_summary(path)
    hw = hardware.detect(probe=False)
    plan = planner.make_plan(summary, Placement(), RunOptions(n_ctx=4096, n_threads=1, swa_full=swa_full), hw)
    full = 4096 * summary.n_layer * 2 * summary.n_head_kv[0] * summary.head_dim_k * 2  # K and V, f16
    assert (plan.memory["cpu"].kv == full) is swa_full
    with Engine.load(path, plan, extra_bufts=False) as e:
        assert abs(e.memory["cpu"].kv - plan.memory["cpu"].kv) <= 0.01 * MiB
        assert e.deviations() == []
