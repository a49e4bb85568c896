"""The GGUF header parser and the model summary, on real test models and on hostile bytes.

Parameter counts are checked three ways: against llama.cpp's own count, against arithmetic done here
by hand from each architecture's Spec, and per tensor against gguf's reader.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import gguf
import pytest

from moelocal import cli
from moelocal.errors import GGUFFormatError, ModelFileError, NeedMoreBytes
from moelocal.gguf_model import MAX_ARRAY, MAX_STRING, parse_header, read_summary, summarize
from moelocal.testmodels import ARCHS, DEFAULT_QUANTS, SPECS

MODEL_KEYS = [f"{arch}-{q}" for arch in ARCHS for q in DEFAULT_QUANTS]


# ---- parameters worked out by hand -----------------------------------------------------------


def hand_count(arch: str) -> tuple[int, int]:
    """(total parameters, parameters in routed experts) of the test model, from its Spec alone."""
    s = SPECS[arch]
    e, L = s.n_embd, s.n_layer
    outside = 2 * e * s.n_vocab + e  # token_embd, output, output_norm
    if arch == "llama-dense":
        q, kv = s.n_head * s.head_dim, s.n_head_kv * s.head_dim
        layer = 2 * e + (e * q + 2 * e * kv + q * e) + 3 * e * s.n_ff  # norms, attention, FFN
        return outside + L * layer, 0
    if arch == "llama-moe":
        q, kv = s.n_head * s.head_dim, s.n_head_kv * s.head_dim
        experts = 3 * e * s.n_ff * s.n_expert  # Mixtral: feed_forward_length is the expert width
        layer = 2 * e + (e * q + 2 * e * kv + q * e) + e * s.n_expert + experts
        return outside + L * layer, L * experts
    if arch == "qwen2moe":
        q, kv = s.n_head * s.head_dim, s.n_head_kv * s.head_dim
        attention = e * q + 2 * e * kv + q * e + (q + 2 * kv)  # with q/k/v biases
        experts = 3 * e * s.expert_ff * s.n_expert
        shared = e + 3 * e * s.shared_ff  # the shared expert's gate (a vector) and its FFN
        layer = 2 * e + attention + e * s.n_expert + experts + shared
        return outside + L * layer, L * experts
    if arch == "qwen3moe":
        q, kv = s.n_head * s.head_dim, s.n_head_kv * s.head_dim
        attention = e * q + 2 * e * kv + q * e + 2 * s.head_dim  # with q/k norms
        experts = 3 * e * s.expert_ff * s.n_expert
        layer = 2 * e + attention + e * s.n_expert + experts
        return outside + L * layer, L * experts
    if arch in ("qwen35moe", "qwen3next"):
        q, kv = s.n_head * s.head_dim, s.n_head_kv * s.head_dim
        attention = e * 2 * q + 2 * e * kv + q * e + 2 * s.head_dim  # queries and their gate, q/k norms
        hv, key_dim, value_dim = s.ssm_v_heads, s.ssm_state * s.ssm_groups, s.ssm_state * s.ssm_v_heads
        conv = 2 * key_dim + value_dim
        delta_net = (e * conv + e * value_dim  # attn_qkv and attn_gate (qwen3next: both in ssm_in)
                     + s.ssm_conv * conv + 2 * hv + 2 * e * hv  # conv1d, dt bias, A, beta and alpha
                     + s.ssm_state + value_dim * e)  # ssm_norm, ssm_out
        experts = 3 * e * s.expert_ff * s.n_expert
        ffn = e * s.n_expert + experts + e + 3 * e * s.shared_ff  # router, experts, shared gate and FFN
        n_attn = L // s.attention_interval
        return outside + L * (2 * e + ffn) + n_attn * attention + (L - n_attn) * delta_net, L * experts
    if arch == "glm4moe":  # an MTP layer after the trunk, counted: llama.cpp counts it too
        q, kv = s.n_head * s.head_dim, s.n_head_kv * s.head_dim
        attention = e * q + 2 * e * kv + q * e + (q + 2 * kv)  # with q/k/v biases
        dense = 2 * e + attention + 3 * e * s.n_ff
        experts = 3 * e * s.expert_ff * s.n_expert
        moe = 2 * e + attention + e * s.n_expert + s.n_expert + experts + 3 * e * s.shared_ff  # + exp_probs_b
        mtp = moe + 2 * e * e + 2 * e  # eh_proj, enorm, hnorm
        n_moe = L - s.leading_dense
        return outside + s.leading_dense * dense + n_moe * moe + mtp, (n_moe + 1) * experts
    if arch == "deepseek2":
        qk = s.qk_nope_dim + s.rope_dim
        attention = (
            s.q_lora_rank + s.kv_lora_rank  # q_a_norm, kv_a_norm
            + e * s.q_lora_rank + s.q_lora_rank * s.n_head * qk  # q_a, q_b
            + e * (s.kv_lora_rank + s.rope_dim)  # kv_a_mqa
            + s.qk_nope_dim * s.kv_lora_rank * s.n_head + s.kv_lora_rank * s.v_head_dim * s.n_head  # k_b, v_b
            + s.n_head * s.v_head_dim * e  # output
        )
        dense = 2 * e + attention + 3 * e * s.n_ff
        experts = 3 * e * s.expert_ff * s.n_expert
        moe = 2 * e + attention + e * s.n_expert + s.n_expert + experts + 3 * e * s.shared_ff  # + exp_probs_b
        n_moe = L - s.leading_dense
        return outside + s.leading_dense * dense + n_moe * moe, n_moe * experts
    if arch == "gpt-oss":
        q, kv = s.n_head * s.head_dim, s.n_head_kv * s.head_dim
        attention = e * q + 2 * e * kv + q * e + (q + 2 * kv + e) + s.n_head  # biases, sinks
        ff = s.expert_ff
        experts = s.n_expert * (3 * e * ff + 2 * ff + e)  # weights and biases
        layer = 2 * e + attention + (e * s.n_expert + s.n_expert) + experts
        return outside + L * layer, L * experts
    raise AssertionError(arch)


# The same numbers, written out, so a change to a Spec cannot slip past both sides at once.
HAND_TOTALS = {
    "llama-dense": (2_623_744, 2_623_744),
    "llama-moe": (4_200_704, 2_627_840),
    "qwen2moe": (6_039_808, 4_466_944),
    "qwen3moe": (6_300_416, 3_154_688),
    "deepseek2": (6_005_004, 4_825_356),
    "gpt-oss": (4_216_096, 2_637_088),
    "qwen35moe": (6_843_920, 3_698_192),
    "qwen3next": (6_843_920, 3_698_192),  # the same parameters, packed into other matrices
    "glm4moe": (5_711_632, 4_138_768),
}


@pytest.mark.parametrize("arch", ARCHS)
def test_hand_arithmetic_matches_the_written_numbers(arch):
    s = SPECS[arch]
    total, routed = hand_count(arch)
    active = total - routed + routed * s.n_expert_used // max(s.n_expert, 1)
    assert (total, active) == HAND_TOTALS[arch]


@pytest.mark.parametrize("key", MODEL_KEYS)
def test_params_total_is_llama_cpps_count_and_active_is_by_hand(models, load_llama, key):
    import llama_cpp

    arch = key.rsplit("-", 1)[0]
    summary = read_summary(models[key])
    with load_llama(models[key]) as m:
        assert summary.params_total == llama_cpp.llama_model_n_params(m.model)
    total, active = HAND_TOTALS[arch]
    assert summary.params_total == total
    assert summary.params_active == active


@pytest.mark.parametrize("key", MODEL_KEYS)
def test_every_tensor_agrees_with_ggufs_reader(models, key):
    summary = read_summary(models[key])
    reader = gguf.GGUFReader(models[key])
    assert [t.name for t in summary.tensors] == [t.name for t in reader.tensors]
    for mine, theirs in zip(summary.tensors, reader.tensors, strict=True):
        assert mine.shape == tuple(int(d) for d in theirs.shape), mine.name
        assert mine.ggml_type == theirs.tensor_type.name, mine.name
        assert (mine.n_params, mine.n_bytes) == (theirs.n_elements, theirs.n_bytes), mine.name
    assert sum(summary.bytes_by_role.values()) == summary.tensor_bytes == sum(t.n_bytes for t in reader.tensors)
    assert sum(summary.params_by_role.values()) == summary.params_total
    assert summary.file_size == models[key].stat().st_size
    assert summary.unknown_tensors == ()


@pytest.mark.parametrize("arch", ARCHS)
def test_hyperparameters(models, arch):
    s = SPECS[arch]
    summary = read_summary(models[f"{arch}-q4_k"])
    assert summary.architecture == s.arch
    assert summary.name == f"moelocal test {arch}"
    # block_count: the 4 trunk layers and any MTP layer after them
    assert (summary.n_layer, summary.n_embd, summary.n_vocab, summary.context_length) == (4 + s.nextn, 256, 512, 4096)
    assert summary.mtp_layers == tuple(range(4, 4 + s.nextn))
    assert summary.n_head == (s.n_head,) * (4 + s.nextn)
    assert summary.n_head_kv == (s.n_head_kv,) * (4 + s.nextn)
    assert (summary.n_expert, summary.n_expert_used) == (s.n_expert, s.n_expert_used)
    assert summary.n_expert_shared == s.n_expert_shared
    assert summary.expert_ff == s.expert_ff
    assert summary.shared_expert_ff == s.shared_ff
    assert summary.leading_dense_layers == s.leading_dense
    assert summary.moe_layers == s.moe_layers
    assert summary.is_moe == (s.n_expert > 0)
    assert (summary.q_lora_rank, summary.kv_lora_rank) == (s.q_lora_rank, s.kv_lora_rank)
    assert summary.sliding_window == s.sliding_window
    assert summary.quantization == "Q4_K"


def test_attention_shapes_of_mla_and_sliding_window(models):
    ds = read_summary(models["deepseek2-f16"])
    # MLA caches one compressed "head": kv_lora_rank + rope_dim for keys, kv_lora_rank for values
    assert (ds.head_dim_k, ds.head_dim_v, ds.rope_dim) == (256 + 32, 256, 32)
    oss = read_summary(models["gpt-oss-f16"])
    assert oss.swa_layers == (True, False, True, False)  # llama.cpp's pattern for gpt-oss: even layers slide
    assert (oss.head_dim_k, oss.head_dim_v) == (64, 64)
    q3 = read_summary(models["qwen3moe-f16"])
    assert (q3.head_dim_k, q3.swa_layers, q3.recurrent_layers) == (64, (False,) * 4, ())


@pytest.mark.parametrize(
    ("key", "tensor", "role", "layer"),
    [
        ("qwen3moe-f16", "token_embd.weight", "embeddings", None),
        ("qwen3moe-f16", "output.weight", "output", None),
        ("qwen3moe-f16", "output_norm.weight", "norm", None),
        ("qwen3moe-f16", "blk.2.ffn_down_exps.weight", "routed_experts", 2),
        ("qwen3moe-f16", "blk.0.ffn_gate_inp.weight", "router", 0),
        ("qwen3moe-f16", "blk.3.attn_k_norm.weight", "norm", 3),
        ("qwen3moe-f16", "blk.1.attn_q.weight", "attention", 1),
        ("qwen2moe-f16", "blk.0.ffn_up_shexp.weight", "shared_experts", 0),
        ("qwen2moe-f16", "blk.0.ffn_gate_inp_shexp.weight", "shared_experts", 0),
        ("qwen2moe-f16", "blk.0.attn_v.bias", "attention", 0),
        ("deepseek2-f16", "blk.0.ffn_up.weight", "dense_ffn", 0),
        ("deepseek2-f16", "blk.1.exp_probs_b.bias", "router", 1),
        ("deepseek2-f16", "blk.1.attn_kv_a_mqa.weight", "attention", 1),
        ("deepseek2-f16", "blk.1.attn_k_b.weight", "attention", 1),
        ("deepseek2-f16", "blk.3.ffn_gate_shexp.weight", "shared_experts", 3),
        ("deepseek2-f16", "blk.2.attn_q_a_norm.weight", "norm", 2),
        ("gpt-oss-f16", "blk.0.attn_sinks.weight", "attention", 0),
        ("gpt-oss-f16", "blk.0.ffn_gate_exps.bias", "routed_experts", 0),
        ("gpt-oss-f16", "blk.0.ffn_gate_inp.bias", "router", 0),
        ("gpt-oss-f16", "blk.1.post_attention_norm.weight", "norm", 1),
        ("llama-dense-f16", "blk.0.ffn_gate.weight", "dense_ffn", 0),
    ],
)
def test_roles_of_named_tensors(models, key, tensor, role, layer):
    by_name = {t.name: t for t in read_summary(models[key]).tensors}
    assert (by_name[tensor].role, by_name[tensor].layer) == (role, layer)


def test_bytes_by_role_by_hand(models):
    # F16 matrices are 2 bytes a weight; vectors, norms and routers stay F32, 4 bytes.
    s = SPECS["deepseek2"]
    e, attn_mats = s.n_embd, 256 * 512 + 512 * 4 * 96 + 256 * 288 + 64 * 256 * 4 + 256 * 64 * 4 + 256 * 256
    assert read_summary(models["deepseek2-f16"]).bytes_by_role == {
        "routed_experts": 3 * (3 * e * 256 * 4) * 2,
        "shared_experts": 3 * (3 * e * 256) * 2,
        "router": 3 * (e * 4 + 4) * 4,
        "attention": 4 * attn_mats * 2,
        "dense_ffn": 3 * e * 512 * 2,
        "embeddings": e * 512 * 2,
        "output": e * 512 * 2,
        "norm": (4 * (e + e + 512 + 256) + e) * 4,
    }
    q4 = read_summary(models["qwen3moe-q4_k"]).bytes_by_role
    # Q4_K: 144 bytes per 256 weights
    assert q4["routed_experts"] == 4 * 3 * 256 * 256 * 6 // 256 * 144
    assert q4["router"] == 4 * 256 * 6 * 4


# ---- split sets ------------------------------------------------------------------------------


def test_a_split_set_reads_whole_from_any_shard_and_llama_cpp_agrees(models, split_model, load_llama):
    import llama_cpp

    shards = sorted(split_model.parent.glob("qwen3moe-f16-*-of-00003.gguf"))
    assert [p.name for p in shards] == [f"qwen3moe-f16-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    whole = read_summary(models["qwen3moe-f16"])
    summaries = [read_summary(p) for p in shards]
    for s in summaries:
        assert s.files == tuple(str(p) for p in shards)
        assert s.file_size == sum(p.stat().st_size for p in shards)
        assert s.params_total == whole.params_total
        assert s.params_active == whole.params_active
        assert s.bytes_by_role == whole.bytes_by_role
        assert s.n_expert == 6 and s.architecture == "qwen3moe"
        assert s.to_dict() == summaries[0].to_dict()
    # the later shards carry no architecture of their own: only the set makes a model
    assert "general.architecture" not in gguf.GGUFReader(shards[1]).fields
    with load_llama(shards[0]) as m:
        assert llama_cpp.llama_model_n_params(m.model) == whole.params_total
        assert len(m.generate("Hello world", n_predict=2)) == 2


def test_inspect_json_on_a_later_shard_shows_the_whole_set(split_model, capsys):
    code, out, err = run_cli(["inspect", str(split_model.with_name("qwen3moe-f16-00002-of-00003.gguf")), "--json"],
                             capsys)
    assert code == 0, err
    data = json.loads(out)
    assert len(data["files"]) == 3
    assert (data["params_total"], data["params_active"]) == HAND_TOTALS["qwen3moe"]


def test_a_split_set_with_a_missing_shard_is_refused(split_model, tmp_path):
    for i in (1, 3):
        name = f"qwen3moe-f16-0000{i}-of-00003.gguf"
        shutil.copy(split_model.parent / name, tmp_path / name)
    with pytest.raises(ModelFileError, match=r"one of 3 split files, and 1 are missing: qwen3moe-f16-00002"):
        read_summary(tmp_path / "qwen3moe-f16-00003-of-00003.gguf")


# ---- bad input -------------------------------------------------------------------------------


def gstr(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def header(n_tensors: int = 0, n_kv: int = 0, body: bytes = b"", version: int = 3) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv) + body


ARCH_KV = gstr("general.architecture") + struct.pack("<I", 8) + gstr("llama")


def refused(path: Path, error: type[Exception], match: str) -> None:
    """read_summary raises exactly ``error``, at once, without allocating more than a little."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(error, match=match) as info:
            read_summary(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert type(info.value) is error
    assert time.perf_counter() - start < 1.0
    assert peak < 4 << 20


def test_missing_path_and_directory(tmp_path):
    refused(tmp_path / "nope.gguf", ModelFileError, "nope.gguf does not exist")
    refused(tmp_path, ModelFileError, "is a directory, not a GGUF file")


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "is empty"),
        (b"PK\x03\x04 this is a zip file, not a model", "not a GGUF model"),
        (header(version=7), "GGUF version 7"),
        (header(n_tensors=1 << 40), "claims 1099511627776 tensors"),
        (header(n_kv=1 << 40), "1099511627776 metadata keys"),
        # a key whose length is absurd, and one that is merely longer than the file
        (header(n_kv=1, body=struct.pack("<Q", 1 << 60)), "a string claims 1152921504606846976 bytes"),
        (header(n_kv=1, body=struct.pack("<Q", MAX_STRING)), "truncated"),
        # arrays: absurd length, a string array that could never fit, a scalar array longer than the file
        (header(n_kv=1, body=gstr("a") + struct.pack("<IIQ", 9, 4, 1 << 62)), "an array claims 4611686018427387904"),
        (header(n_kv=1, body=gstr("a") + struct.pack("<IIQ", 9, 8, MAX_ARRAY)), f"an array claims {MAX_ARRAY} strings"),
        (header(n_kv=1, body=gstr("a") + struct.pack("<IIQ", 9, 10, MAX_ARRAY)), "truncated"),
        (header(n_kv=1, body=gstr("a") + struct.pack("<IIQ", 9, 9, 1 << 20)), "nested array of 1048576"),
        (header(n_kv=1, body=gstr("a") + struct.pack("<I", 99)), "unknown value type 99"),
        # tensors: too many dimensions, a type no one knows, a shape far larger than the file
        (header(1, 1, ARCH_KV + gstr("t") + struct.pack("<I", 1000)), "has 1000 dimensions"),
        (header(1, 1, ARCH_KV + gstr("t") + struct.pack("<IQIQ", 1, 32, 999, 0)), "ggml type 999"),
        (header(1, 1, ARCH_KV + gstr("t") + struct.pack("<IQQIQ", 2, 1 << 31, 1 << 31, 0, 0)), "truncated"),
        (header(0, 1, gstr("general.alignment") + struct.pack("<II", 4, 3)), "alignment 3"),
    ],
)
def test_malformed_files_raise_format_errors_quickly(tmp_path, data, match):
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    refused(path, GGUFFormatError, match)


def test_truncated_header_and_truncated_data(models, tmp_path):
    full = models["llama-dense-q4_k"].read_bytes()
    data_offset = parse_header(full).data_offset
    cut_header = tmp_path / "header.gguf"
    cut_header.write_bytes(full[: data_offset // 2])
    refused(cut_header, GGUFFormatError, r"header\.gguf is truncated: its header ends early")
    cut_data = tmp_path / "data.gguf"
    cut_data.write_bytes(full[:-1000])
    refused(cut_data, GGUFFormatError, rf"its tensors need {len(full)} bytes but the file has {len(full) - 1000}")


def test_a_prefix_asks_for_more_bytes_then_parses_like_the_file(models):
    full = models["deepseek2-q4_k"].read_bytes()
    whole = parse_header(full)
    with pytest.raises(NeedMoreBytes) as info:
        parse_header(full[:4096], complete=False)
    assert 4096 < info.value.needed <= whole.data_offset
    assert parse_header(full[: whole.data_offset], complete=False) == whole


def test_a_header_without_its_file_summarizes_the_same(models):
    path = models["qwen3moe-q8_0"]
    prefix = path.read_bytes()[:65536]
    alone = summarize([parse_header(prefix, complete=False)], [], 0)
    assert alone.name == "moelocal test qwen3moe"
    assert (alone.params_total, alone.params_active) == HAND_TOTALS["qwen3moe"]
    assert alone.bytes_by_role == read_summary(path).bytes_by_role


def test_no_architecture_is_refused(tmp_path):
    path = tmp_path / "anon.gguf"
    path.write_bytes(header())
    refused(path, GGUFFormatError, "no general.architecture key")


# ---- the command line ------------------------------------------------------------------------


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        cli.main(argv)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("arch", ARCHS)
def test_inspect_json_prints_the_summary(models, capsys, arch):
    s = SPECS[arch]
    path = models[f"{arch}-f16"]
    code, out, err = run_cli(["inspect", str(path), "--json"], capsys)
    assert code == 0, err
    data = json.loads(out)
    total, active = HAND_TOTALS[arch]
    assert {k: data[k] for k in (
        "architecture", "n_layer", "n_expert", "n_expert_used", "n_expert_shared",
        "params_total", "params_active", "file_size", "context_length",
    )} == {
        "architecture": s.arch, "n_layer": 4 + s.nextn, "n_expert": s.n_expert, "n_expert_used": s.n_expert_used,
        "n_expert_shared": s.n_expert_shared, "params_total": total, "params_active": active,
        "file_size": path.stat().st_size, "context_length": 4096,
    }
    assert data["bytes_by_role"] == read_summary(path).bytes_by_role
    assert sum(data["bytes_by_role"].values()) == sum(t.n_bytes for t in gguf.GGUFReader(path).tensors)


def test_inspect_human_output(models, capsys):
    code, out, err = run_cli(["inspect", str(models["deepseek2-q4_k"])], capsys)
    assert code == 0, err
    assert "MoE: 4 experts, 2 used per token, 1 shared, first 1 layers dense" in out
    assert "MLA (kv rank 256, q rank 512)" in out


@pytest.mark.parametrize("kind", ["missing", "directory", "not-gguf"])
def test_inspect_bad_path_is_one_line_and_exit_2(tmp_path, capsys, kind):
    target = {"missing": tmp_path / "missing.gguf", "directory": tmp_path, "not-gguf": tmp_path / "notes.gguf"}[kind]
    if kind == "not-gguf":
        target.write_text("just some notes\n")
    code, out, err = run_cli(["inspect", str(target), "--json"], capsys)
    assert code == 2
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), err
    assert "Traceback" not in err


def test_inspect_bad_path_in_a_real_process(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "moelocal", "inspect", str(tmp_path / "missing.gguf")],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [
        f"Error: {tmp_path / 'missing.gguf'} does not exist (check the path, or give a Hugging Face repo as org/name)"
    ]


def test_recurrent_layers_follow_llama_cpps_rules():
    """Which layers keep a recurrent state: an explicit per-layer list, else every n-th layer attends
    (4 when a Qwen3.5/Qwen3-Next file does not say), MTP layers at the end attend, else Mamba-style
    hybrids mark recurrent layers with head_count_kv 0."""
    from moelocal.gguf_model import _recurrent_layers

    kv = (2,) * 8
    assert _recurrent_layers("qwen35moe", 8, {}, kv) == (0, 1, 2, 4, 5, 6)  # the default interval
    assert _recurrent_layers("qwen35moe", 8, {"qwen35moe.full_attention_interval": 2}, kv) == (0, 2, 4, 6)
    listed = {"qwen35moe.attention.recurrent_layers": [True, False] * 4}
    assert _recurrent_layers("qwen35moe", 8, listed, kv) == (0, 2, 4, 6)
    with_mtp = {"qwen35moe.nextn_predict_layers": 1}
    assert _recurrent_layers("qwen35moe", 9, with_mtp, (2,) * 9) == (0, 1, 2, 4, 5, 6)  # layer 8 is MTP
    jamba = {"jamba.ssm.state_size": 16}
    assert _recurrent_layers("jamba", 4, jamba, (0, 0, 0, 8)) == (0, 1, 2)
    assert _recurrent_layers("qwen3moe", 8, {}, kv) == ()


@pytest.mark.parametrize("name", [None, "n/a", "N/A", "", "  "])
def test_a_model_without_a_name_is_shown_by_its_file_name(tmp_path, capsys, name):
    """Converters write general.name "n/a" (or nothing) when they know none: the file says more."""
    from moelocal import archgen

    meta = {"qwen3moe.block_count": ("u32", 2), "qwen3moe.embedding_length": ("u32", 64)}
    if name is not None:
        meta["general.name"] = ("str", name)
    path = archgen.write(archgen.Recipe("qwen3moe", meta), tmp_path / "Qwen3-Coder-Q4_K_M.gguf")
    assert read_summary(path).name == "Qwen3-Coder-Q4_K_M"
    code, out, _ = run_cli(["inspect", str(path)], capsys)
    assert code == 0 and "Qwen3-Coder-Q4_K_M" in out and "n/a" not in out.lower()
    shard = summarize([parse_header(path.read_bytes())], ["/m/Big-Q4_K_M-00001-of-00003.gguf"], 0)
    assert shard.name == "Big-Q4_K_M"  # a split set is named by its stem, not its first shard
    named = archgen.write(archgen.Recipe("qwen3moe", {**meta, "general.name": ("str", "Qwen3 Coder")}),
                          tmp_path / "other.gguf")
    assert read_summary(named).name == "Qwen3 Coder"
