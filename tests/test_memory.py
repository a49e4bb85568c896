"""The memory model against llama.cpp itself.

On the CPU every figure of memory.estimate is checked against what llama.cpp 0.3.36 reserves for the
same model and options (measure.py reads llama_get_memory_breakdown in no_alloc mode): the KV cache
and the compute buffer to the byte, the weights to the byte but for llama.cpp's 32-byte padding of
each tensor, the logits buffer to the precision of llama.cpp's log. Over a loopback RPC worker (a
real offload target without a GPU) the same holds per device for -ngl, --n-cpu-moe and partial
offload. What needs a CUDA GPU (its overhead, op offloading) is checked as arithmetic on
real-sized synthetic summaries.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import replace

import pytest
from loopback import rpc_worker
from synthetic import qwen3moe_summary

from moelocal import layout, memory
from moelocal.gguf_model import parse_header, read_summary
from moelocal.measure import measure, write_sparse
from moelocal.plan import CPU, DeviceMemory, Placement, RunOptions
from moelocal.testmodels import ARCHS, SPECS, write_header_only, write_model

MiB = 1 << 20
LOG_LSB = 0.005 * MiB  # llama.cpp logs buffer sizes in MiB with two decimals
OPTIONS = [  # (n_ctx, n_ubatch, flash_attn, kv_type, n_seq)
    (256, 1, False, "f16", 1),
    (1000, 64, True, "f16", 1),  # n_ctx padded to 1024
    (2048, 512, False, "f16", 1),
    (4096, 512, True, "q8_0", 1),  # quantized K: Hadamard rotations in the graph
    (4096, 128, False, "f32", 1),
    (3000, 256, True, "bf16", 2),  # two sequences: two streams of 1536 cells
    (2048, 96, False, "f16", 3),  # ubatch rounded to a multiple of the sequences
]


def options(n_ctx: int, n_ubatch: int, fa: bool, kv: str, n_seq: int) -> RunOptions:
    return RunOptions(n_ctx=n_ctx, n_ubatch=n_ubatch, flash_attn=fa, kv_type=kv, n_seq=n_seq)


def assert_matches(est: DeviceMemory, real: DeviceMemory, n_tensors: int) -> None:
    assert est.kv == real.kv
    assert est.compute == real.compute
    assert 0 <= real.weights - est.weights <= 32 * n_tensors  # llama.cpp pads each tensor to 32 bytes
    assert abs(est.output - real.output) <= LOG_LSB
    host_est = est.weights + est.kv + est.compute + est.output
    host_real = real.weights + real.kv + real.compute + real.output
    assert abs(host_est - host_real) <= 0.02 * host_real


# ---- the CPU: every architecture, every kind of option --------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("quant", ["f16", "q4_k"])
def test_estimate_equals_llama_cpp_on_the_cpu(models, arch, quant):
    path = models[f"{arch}-{quant}"]
    summary = read_summary(path)
    assert memory.compute_is_exact(summary)
    for opt in OPTIONS:
        o = options(*opt)
        real = measure(path, Placement(), o)
        est = memory.estimate(summary, Placement(), o)
        assert set(real) == set(est) == {CPU}
        assert_matches(est[CPU], real[CPU], len(summary.tensors))


@pytest.mark.parametrize("swa_full", [True, False])
def test_sliding_window_cache_of_gpt_oss(models, swa_full):
    """gpt-oss alternates sliding-window and full layers; llama.cpp's SWA cache holds the window plus
    one ubatch, padded to 256 cells, unless swa_full (llama.cpp's library default) makes it full size."""
    path = models["gpt-oss-q8_0"]
    summary = read_summary(path)
    assert summary.sliding_window == 128
    for n_ctx, n_ubatch in [(256, 16), (4096, 100), (4096, 512), (1000, 512)]:
        o = RunOptions(n_ctx=n_ctx, n_ubatch=n_ubatch, flash_attn=True, swa_full=swa_full)
        real = measure(path, Placement(), o)
        est = memory.estimate(summary, Placement(), o)
        assert_matches(est[CPU], real[CPU], len(summary.tensors))
        cells = memory.swa_cells(summary, o)
        n_ctx_seq = memory.context_sizes(o).n_ctx_seq
        assert cells == (n_ctx_seq if swa_full else min(n_ctx_seq, -(-(128 + min(n_ubatch, n_ctx_seq)) // 256) * 256))


def test_a_real_load_allocates_what_no_alloc_reports(models):
    """no_alloc is only a dry run: a real load (mmap) reserves the same KV and compute buffers, and
    its mapped weights are the file's tensor data."""
    path = models["qwen3moe-q4_k"]
    summary = read_summary(path)
    o = RunOptions(n_ctx=2048, n_ubatch=256)
    real = measure(path, Placement(), o, allocate=True)[CPU]
    est = memory.estimate(summary, Placement(), o)[CPU]
    assert abs(real.kv - est.kv) <= LOG_LSB and abs(real.compute - est.compute) <= LOG_LSB
    assert abs(real.weights - summary.tensor_bytes) <= 32 * len(summary.tensors) + LOG_LSB
    assert abs(real.total - est.total) <= 0.02 * real.total


def test_without_the_breakdown_api_the_log_is_read(models, monkeypatch):
    """Where llama_get_memory_breakdown cannot be read (libc++, MSVC), measure loads for real and
    reads llama.cpp's buffer report: the same figures, to its 0.01 MiB."""
    from moelocal import measure as measure_module

    path = models["llama-moe-q8_0"]
    o = RunOptions(n_ctx=4096, n_ubatch=256)
    exact = measure(path, Placement(), o)[CPU]
    monkeypatch.setattr(measure_module, "_breakdown_fn", lambda: None)
    logged = measure(path, Placement(), o)[CPU]
    assert abs(logged.kv - exact.kv) <= LOG_LSB and abs(logged.compute - exact.compute) <= LOG_LSB
    assert abs(logged.weights - exact.weights) <= 32 * 1024 + LOG_LSB  # the mapped range, not padded sizes


def test_a_header_and_a_hole_measure_like_the_whole_file(models, tmp_path):
    """What a Hub model needs for an exact answer: its header, written before a hole of the file's size."""
    path = models["deepseek2-q8_0"]
    data = path.read_bytes()
    header = parse_header(data)
    sparse = write_sparse(data[: header.data_offset], len(data), tmp_path / "deepseek2-header-only.gguf")
    assert sparse.stat().st_size == len(data)
    o = RunOptions(n_ctx=4096, n_ubatch=512, flash_attn=True)
    assert measure(sparse, Placement(), o) == measure(path, Placement(), o)


# Qwen3.5-35B-A3B's shape (config.json of the published model; no MTP layer, no vision tower): 30
# gated-delta-net layers and 10 attention layers, 256 experts, a 248k vocabulary
QWEN35_35B = replace(SPECS["qwen35moe"], n_layer=40, n_embd=2048, n_head=16, n_head_kv=2, head_dim=256, n_expert=256,
                     n_expert_used=8, expert_ff=512, shared_ff=512, ssm_state=128, ssm_groups=16, ssm_v_heads=32,
                     rope_dim=64, rope_sections=(11, 11, 10, 0), n_vocab=248320, context_length=262144)


# Qwen3-Next-80B-A3B (config.json): 36 delta-net and 12 attention layers, 512 experts, 10 used
QWEN3_NEXT_80B = replace(SPECS["qwen3next"], n_layer=48, n_embd=2048, n_head=16, n_head_kv=2, head_dim=256,
                         n_expert=512, n_expert_used=10, expert_ff=512, shared_ff=512, ssm_state=128, ssm_groups=16,
                         ssm_v_heads=32, rope_dim=64, n_vocab=151936, context_length=262144)


# GLM-4.5-Air (config.json): 46 layers and an MTP layer llama.cpp leaves out, 128 experts
GLM_45_AIR = replace(SPECS["glm4moe"], n_layer=46, nextn=1, n_embd=4096, n_head=96, n_head_kv=8, head_dim=128,
                     n_ff=10944, n_expert=128, n_expert_used=8, expert_ff=1408, shared_ff=1408, rope_dim=64,
                     n_vocab=151552, context_length=131072)


@pytest.mark.parametrize(("spec", "params", "n_recurrent"),
                         [(QWEN35_35B, 34.7e9, 30), (QWEN3_NEXT_80B, 79.7e9, 36), (GLM_45_AIR, 109.2e9, 0)],
                         ids=["qwen3.5-35b-a3b", "qwen3-next-80b-a3b", "glm-4.5-air"])
def test_real_sized_shapes_are_exact_on_the_cpu(tmp_path, spec, params, n_recurrent):
    """At full size the compute buffer's peak is set by the output rows and the vocabulary-wide
    logits, which the hybrids select after the output norm; at test size by the delta-net layers.
    GLM-4.5-Air's MTP layer is in the file (109.2B parameters) but not in memory (106.9B)."""
    path = write_header_only(spec, tmp_path / f"{spec.arch}-shape.gguf")
    summary = read_summary(path)
    assert abs(summary.params_total - params) < 0.01 * params and len(summary.recurrent_layers) == n_recurrent
    assert memory.compute_is_exact(summary)
    for opt in [(4096, 512, True, "f16", 1), (32768, 2048, True, "q8_0", 1), (8192, 256, False, "f16", 2)]:
        o = options(*opt)
        real = measure(path, Placement(), o)[CPU]
        est = memory.estimate(summary, Placement(), o)[CPU]
        assert (est.weights, est.kv, est.compute) == (real.weights, real.kv, real.compute), opt
        assert real.compute > 100 * 2**20  # hundreds of MB: an error here would matter


# Llama 4 Scout (config.json): chunked attention (8192 tokens) on 3 layers of 4, 16 experts, top-1
LLAMA4_SCOUT = replace(SPECS["llama4"], n_layer=48, n_embd=5120, n_head=40, n_head_kv=8, head_dim=128, n_ff=16384,
                       n_expert=16, n_expert_used=1, expert_ff=8192, shared_ff=8192, n_vocab=202048,
                       context_length=10485760)


def test_llama4_chunked_attention_caches_only_its_chunk(tmp_path):
    """A Llama 4 file does not state its 8192-token attention chunks: llama.cpp assumes them, so
    must the plan, or the KV cache of 36 of Scout's 48 layers is billed for the whole context.
    KV exact; compute within 0.5% (the q8_0 KV cache is 8 KB over in llama.cpp: not found yet)."""
    small = write_model("llama4", tmp_path / "llama4-f16.gguf")
    shape = write_header_only(LLAMA4_SCOUT, tmp_path / "llama4-scout-shape.gguf")
    summary = read_summary(shape)
    assert summary.sliding_window == 8192 and sum(summary.swa_layers) == 36
    checks = [(small, options(*opt)) for opt in OPTIONS]
    checks += [(shape, options(32768, 512, True, "f16", 1)), (shape, options(65536, 256, True, "q8_0", 2))]
    for path, o in checks:
        s = read_summary(path)
        real = measure(path, Placement(), o)[CPU]
        est = memory.estimate(s, Placement(), o)[CPU]
        assert est.kv == real.kv and 0 <= real.weights - est.weights <= 32 * len(s.tensors), (path.name, o)
        assert abs(est.compute - real.compute) <= 0.005 * real.compute, (path.name, o)
    everything_full = memory.kv_bytes_by_layer(replace(summary, swa_layers=(False,) * 48), options(32768, 512, True,
                                                                                                      "f16", 1))
    assert sum(memory.kv_bytes_by_layer(summary, options(32768, 512, True, "f16", 1))) < 0.55 * sum(everything_full)


def test_mtp_layers_that_llama_cpp_leaves_out_take_no_memory(tmp_path):
    """Qwen3.5 (like DeepSeek-V3 and GLM-4.5) files may carry a multi-token-prediction layer after
    the trunk; llama.cpp skips its tensors unless asked to load them, so it costs nothing."""
    path = write_model(replace(SPECS["qwen35moe"], nextn=1), tmp_path / "qwen35moe-mtp.gguf")
    summary = read_summary(path)
    assert summary.mtp_layers == (4,) and summary.n_layer == 5 and summary.to_dict()["mtp_layers"] == [4]
    mtp_bytes = summary.layer_bytes(4)
    assert mtp_bytes > 1 << 20  # a whole MoE layer: it would matter
    o = RunOptions(n_ctx=1024, n_ubatch=256)
    real = measure(path, Placement(), o)[CPU]
    est = memory.estimate(summary, Placement(), o)[CPU]
    assert (est.weights, est.kv, est.compute) == (real.weights, real.kv, real.compute)
    assert real.weights < summary.tensor_bytes - mtp_bytes + 32 * len(summary.tensors)
    on_gpu = memory.estimate(summary, Placement(n_gpu_layers=6, devices=("gpu0",)), o)
    assert on_gpu["gpu0"].weights + on_gpu[CPU].weights == est.weights  # nowhere, on any device


# ---- offload: a loopback RPC worker is a device llama.cpp really places tensors on -----------


@pytest.fixture(scope="module")
def worker(tmp_path_factory) -> Iterator[dict[str, int]]:
    """llama.cpp's RPC server for this machine's CPU on loopback, connected: {"rpc0": ggml device}."""
    from moelocal import native

    def argv(port: int) -> list[str]:
        serve = ("from moelocal import native; native.llama().llama_backend_init(); "
                 f"native.rpc_start_server('127.0.0.1:{port}', [native.device_handle('cpu')], 1)")
        return [sys.executable, "-c", serve]

    with rpc_worker(argv, tmp_path_factory.mktemp("worker")) as endpoint:
        yield {"rpc0": native.rpc_add_server(endpoint)[0]}


def offloads(summary) -> list[Placement]:
    n = summary.n_layer
    dev = ("rpc0",)
    out = [Placement(n_gpu_layers=g, devices=dev) for g in (n + 1, n, 2)]
    if summary.is_moe:
        out += [Placement(n_gpu_layers=n + 1, n_cpu_moe=k, tensor_overrides=layout.n_cpu_moe_overrides(k), devices=dev)
                for k in (1, n)]
        out.append(Placement(n_gpu_layers=2, n_cpu_moe=n, tensor_overrides=layout.cpu_moe_overrides(), devices=dev))
    return out


GPT_OSS_20B = replace(SPECS["gpt-oss"], n_layer=24, n_embd=2880, n_head=64, n_head_kv=8, head_dim=64, n_expert=32,
                      n_expert_used=4, expert_ff=2880, n_ff=2880, sliding_window=128, n_vocab=201088,
                      context_length=131072)


@pytest.mark.parametrize("spec", [GPT_OSS_20B, QWEN35_35B], ids=["gpt-oss-20b", "qwen3.5-35b-a3b"])
def test_real_sized_offload_is_exact_per_device(worker, tmp_path, spec):
    """Header-only shapes of real models, offloaded to the loopback worker: three sequences,
    all layers / experts of 12 layers in RAM / 13 layers on the device."""
    path = write_header_only(spec, tmp_path / f"{spec.arch}-shape.gguf")
    summary = read_summary(path)
    n = summary.n_layer
    o = options(4096, 512, True, "f16", 3)
    for placement in (Placement(n_gpu_layers=n + 1, devices=("rpc0",)),
                      Placement(n_gpu_layers=n + 1, n_cpu_moe=12, tensor_overrides=layout.n_cpu_moe_overrides(12),
                                devices=("rpc0",)),
                      Placement(n_gpu_layers=13, devices=("rpc0",))):
        real = measure(path, placement, o, named=worker)
        est = memory.estimate(summary, placement, o, gpu_backend="rpc")
        for dev in (CPU, "rpc0"):
            assert (est[dev].weights, est[dev].kv, est[dev].compute) == \
                (real[dev].weights, real[dev].kv, real[dev].compute), (placement, dev)


@pytest.mark.parametrize("arch", ARCHS)
def test_estimate_equals_llama_cpp_per_device_when_offloading(models, worker, arch):
    path = models[f"{arch}-q8_0"]
    summary = read_summary(path)
    for placement in offloads(summary):
        for opt in [(1024, 512, False, "f16", 1), (2048, 64, True, "q8_0", 2)]:
            o = options(*opt)
            real = measure(path, placement, o, named=worker)
            est = memory.estimate(summary, placement, o, gpu_backend="rpc")
            assert set(real) == set(est) == {CPU, "rpc0"}, placement
            for dev in real:
                assert_matches(est[dev], real[dev], len(summary.tensors))
            assert est["rpc0"].overhead == 0  # an RPC worker's own process pays its overheads


# ---- GPU placements as arithmetic (no CUDA here) ---------------------------------------------


@pytest.fixture(scope="module")
def q30b():
    return qwen3moe_summary()


GPU = ("gpu0",)
OPTS = RunOptions(n_ctx=8192)


def test_n_cpu_moe_moves_exactly_the_experts_of_those_layers(q30b):
    full = memory.estimate(q30b, Placement(n_gpu_layers=49, devices=GPU), OPTS)
    for k in (1, 5, 48):
        p = Placement(n_gpu_layers=49, n_cpu_moe=k, tensor_overrides=layout.n_cpu_moe_overrides(k), devices=GPU)
        est = memory.estimate(q30b, p, OPTS)
        moved = sum(q30b.layer_bytes(il, "routed_experts") for il in range(k))
        assert est[CPU].weights - full[CPU].weights == moved
        assert full["gpu0"].weights - est["gpu0"].weights == moved
        assert est["gpu0"].kv == full["gpu0"].kv  # the KV cache stays with its layers


def test_ngl_counts_the_output_layer_first_then_layers_from_the_end(q30b):
    """llama.cpp 0.3.36 (llama-model.cpp, load_tensors): of the n_layer + 1 "layers" (the repeating
    ones, then the output head) the last -ngl go to the GPU, so the head goes first: -ngl 1 is the
    head alone, -ngl n_layer the head and all but the first layer. The input embeddings stay on the
    CPU whatever -ngl says."""
    by_name = {t.name: t.n_bytes for t in q30b.tensors}
    layer = q30b.layer_bytes(47)
    kv_layer = memory.kv_bytes_by_layer(q30b, OPTS)[47]
    out = by_name["output.weight"] + by_name["output_norm.weight"]
    embd = by_name["token_embd.weight"]
    for ngl, gpu_layers, output_on_gpu in [(49, 48, True), (48, 47, True), (10, 9, True), (1, 0, True)]:
        est = memory.estimate(q30b, Placement(n_gpu_layers=ngl, devices=GPU), OPTS)
        assert est["gpu0"].weights == gpu_layers * layer + (out if output_on_gpu else 0)
        assert est[CPU].weights == q30b.tensor_bytes - est["gpu0"].weights  # input embeddings: always CPU
        assert est[CPU].weights >= embd
        assert est["gpu0"].kv == gpu_layers * kv_layer
        assert est[CPU].kv == (48 - gpu_layers) * kv_layer
    cpu_only = memory.estimate(q30b, Placement(n_gpu_layers=0, devices=GPU), OPTS)
    assert set(cpu_only) == {CPU, "gpu0"} and cpu_only["gpu0"] == DeviceMemory()


def test_kv_cache_per_type_and_context_rounding(q30b):
    # 48 layers, 4 KV heads of 128: K and V rows of 512 elements
    for kv_type, row in [("f16", 1024), ("bf16", 1024), ("f32", 2048), ("q8_0", 512 // 32 * 34),
                         ("q4_0", 512 // 32 * 18)]:
        for n_ctx, cells in [(8192, 8192), (1000, 1024), (1, 256)]:
            o = RunOptions(n_ctx=n_ctx, kv_type=kv_type, flash_attn=kv_type.startswith("q"))
            assert memory.estimate(q30b, Placement(), o)[CPU].kv == 48 * 2 * row * cells
    # sequences each get a stream of their own, padded to 256 cells
    assert memory.kv_bytes_by_layer(q30b, RunOptions(n_ctx=1000, n_seq=3))[0] == 3 * 512 * 2 * 1024
    assert memory.kv_bytes_per_token(q30b, 0, "q8_0") == 2 * 512 * 34 / 32


def test_mla_caches_the_latent_and_no_v(models):
    summary = read_summary(models["deepseek2-f16"])
    o = RunOptions(n_ctx=4096)
    # kv_lora_rank 256 + rope 32, one "head", f16; V is read out of K
    assert memory.kv_bytes_by_layer(summary, o) == (4096 * 288 * 2,) * 4
    assert memory.kv_bytes_per_token(summary, 1) == 288 * 2


def test_context_sizes_follow_llama_cpp():
    s = memory.context_sizes(RunOptions(n_ctx=3000, n_ubatch=512, n_batch=2048, n_seq=2))
    assert (s.n_ctx, s.n_ctx_seq, s.n_stream, s.n_batch, s.n_ubatch, s.n_tokens, s.n_outputs) == (
        3072, 1536, 2, 2048, 512, 512, 512)
    s = memory.context_sizes(RunOptions(n_ctx=100, n_ubatch=512))
    assert (s.n_ctx, s.n_batch, s.n_ubatch, s.n_tokens) == (256, 256, 256, 256)
    s = memory.context_sizes(RunOptions(n_ctx=4096, n_ubatch=100, n_seq=3))
    assert (s.n_ctx, s.n_ctx_seq, s.n_tokens, s.n_outputs) == (4608, 1536, 102, 100)


def test_output_buffer_and_overheads(q30b):
    est = memory.estimate(q30b, Placement(n_gpu_layers=49, devices=("gpu0", "gpu1"), tensor_split=(1.0, 1.0)),
                          replace(OPTS, n_seq=4), gpu_backend="cuda")
    assert est[CPU].output == 151936 * 4 * 4 and est["gpu0"].output == est["gpu1"].output == 0
    assert est["gpu0"].overhead == est["gpu1"].overhead == memory.BACKEND_OVERHEAD["cuda"]
    assert est[CPU].overhead == 0
    assert memory.safety_margin(100 * MiB) == 256 * MiB and memory.safety_margin(100 * 1024 * MiB) == 5 * 1024 * MiB


def test_op_offload_copies_host_experts_into_the_gpu_compute_buffer(q30b):
    """With --n-cpu-moe, CUDA multiplies host experts on the GPU for ubatches of 32 tokens or more,
    copying them into its compute buffer (ggml-backend.cpp); over RPC, and for smaller ubatches,
    nothing is copied."""
    p = Placement(n_gpu_layers=49, n_cpu_moe=1, tensor_overrides=layout.n_cpu_moe_overrides(1), devices=GPU)
    full = Placement(n_gpu_layers=49, devices=GPU)
    expert = max(t.n_bytes for t in q30b.tensors if t.role == "routed_experts")
    o = RunOptions(n_ctx=4096, n_ubatch=64, flash_attn=True)  # small enough for the copies to be the peak
    cuda = memory.compute_by_device(q30b, p, o, "cuda")["gpu0"]
    assert cuda >= expert  # one expert tensor at a time: each offloaded product is a split of its own
    assert memory.compute_by_device(q30b, full, o, "cuda")["gpu0"] < expert
    assert memory.compute_by_device(q30b, p, o, "rpc")["gpu0"] < expert
    more = Placement(n_gpu_layers=49, n_cpu_moe=20, tensor_overrides=layout.n_cpu_moe_overrides(20), devices=GPU)
    assert memory.compute_by_device(q30b, more, o, "cuda")["gpu0"] == cuda
    small = replace(o, n_ubatch=16)
    assert memory.compute_by_device(q30b, p, small, "cuda") == memory.compute_by_device(q30b, p, small, "rpc")
