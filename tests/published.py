"""Summaries of the real models in tests/data/published_speeds.json, built from their shapes alone,
and the machine each published row describes, as `fit` would be told it on the command line.

The speed model is judged on these rows (tests/test_speed_model.py, scripts/bench_speed_model.py).
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from types import MappingProxyType

from gguf.constants import GGMLQuantizationType as T

from moelocal import hardware, planner
from moelocal.gguf_model import Header, ModelSummary, RawTensor, summarize
from moelocal.hardware import Hardware
from moelocal.plan import Plan, RunOptions

ROWS = Path(__file__).parent / "data" / "published_speeds.json"
GiB = 1 << 30


def _more_bits(il: int, n: int) -> bool:
    """llama.cpp's Q4_K_M rule for the layers whose ffn_down (and attn_v) get Q6_K."""
    return il < n // 8 or il >= 7 * n // 8 or (il - n // 8) % 3 == 2


def _qwen3moe(name: str, n_layer: int, n_embd: int, n_head: int, n_head_kv: int, n_expert: int, n_used: int,
              expert_ff: int, context: int) -> ModelSummary:
    """A Q4_K_M qwen3moe file: Q4_K almost everywhere, Q6_K for the output head and, in the layers
    llama.cpp's rule picks, for ffn_down and attn_v."""
    arch, hd, vocab = "qwen3moe", 128, 151936
    meta = {
        "general.architecture": arch, "general.name": name, f"{arch}.block_count": n_layer,
        f"{arch}.embedding_length": n_embd, f"{arch}.attention.head_count": n_head,
        f"{arch}.attention.head_count_kv": n_head_kv, f"{arch}.attention.key_length": hd,
        f"{arch}.attention.value_length": hd, f"{arch}.context_length": context, f"{arch}.expert_count": n_expert,
        f"{arch}.expert_used_count": n_used, f"{arch}.expert_feed_forward_length": expert_ff,
        f"{arch}.vocab_size": vocab,
    }
    tensors = [RawTensor("token_embd.weight", (n_embd, vocab), T.Q4_K, 0),
               RawTensor("output_norm.weight", (n_embd,), T.F32, 0),
               RawTensor("output.weight", (n_embd, vocab), T.Q6_K, 0)]
    for il in range(n_layer):
        b, more = f"blk.{il}.", _more_bits(il, n_layer)
        tensors += [
            RawTensor(b + "attn_norm.weight", (n_embd,), T.F32, 0),
            RawTensor(b + "attn_q.weight", (n_embd, n_head * hd), T.Q4_K, 0),
            RawTensor(b + "attn_k.weight", (n_embd, n_head_kv * hd), T.Q4_K, 0),
            RawTensor(b + "attn_v.weight", (n_embd, n_head_kv * hd), T.Q6_K if more else T.Q4_K, 0),
            RawTensor(b + "attn_output.weight", (n_head * hd, n_embd), T.Q4_K, 0),
            RawTensor(b + "attn_q_norm.weight", (hd,), T.F32, 0),
            RawTensor(b + "attn_k_norm.weight", (hd,), T.F32, 0),
            RawTensor(b + "ffn_norm.weight", (n_embd,), T.F32, 0),
            RawTensor(b + "ffn_gate_inp.weight", (n_embd, n_expert), T.F32, 0),
            RawTensor(b + "ffn_gate_exps.weight", (n_embd, expert_ff, n_expert), T.Q4_K, 0),
            RawTensor(b + "ffn_up_exps.weight", (n_embd, expert_ff, n_expert), T.Q4_K, 0),
            RawTensor(b + "ffn_down_exps.weight", (expert_ff, n_embd, n_expert), T.Q6_K if more else T.Q4_K, 0),
        ]
    return summarize([Header(3, MappingProxyType(meta), tuple(tensors), 32, 0)], [f"/nonexistent/{name}.gguf"], 0)


def _gpt_oss(name: str, n_layer: int, n_expert: int) -> ModelSummary:
    """ggml-org's MXFP4 gpt-oss file: MXFP4 experts, Q8_0 for everything else (12.1 GB for the 20b)."""
    arch, n_embd, ff, n_head, n_head_kv, hd, vocab = "gpt-oss", 2880, 2880, 64, 8, 64, 201088
    meta = {
        "general.architecture": arch, "general.name": name, f"{arch}.block_count": n_layer,
        f"{arch}.embedding_length": n_embd, f"{arch}.attention.head_count": n_head,
        f"{arch}.attention.head_count_kv": n_head_kv, f"{arch}.attention.key_length": hd,
        f"{arch}.attention.value_length": hd, f"{arch}.context_length": 131072, f"{arch}.expert_count": n_expert,
        f"{arch}.expert_used_count": 4, f"{arch}.expert_feed_forward_length": ff,
        f"{arch}.attention.sliding_window": 128, f"{arch}.vocab_size": vocab,
    }
    q, kv = n_head * hd, n_head_kv * hd
    tensors = [RawTensor("token_embd.weight", (n_embd, vocab), T.Q8_0, 0),
               RawTensor("output_norm.weight", (n_embd,), T.F32, 0),
               RawTensor("output.weight", (n_embd, vocab), T.Q8_0, 0)]
    for il in range(n_layer):
        b = f"blk.{il}."
        tensors += [
            RawTensor(b + "attn_norm.weight", (n_embd,), T.F32, 0),
            RawTensor(b + "attn_q.weight", (n_embd, q), T.Q8_0, 0),
            RawTensor(b + "attn_q.bias", (q,), T.F32, 0),
            RawTensor(b + "attn_k.weight", (n_embd, kv), T.Q8_0, 0),
            RawTensor(b + "attn_k.bias", (kv,), T.F32, 0),
            RawTensor(b + "attn_v.weight", (n_embd, kv), T.Q8_0, 0),
            RawTensor(b + "attn_v.bias", (kv,), T.F32, 0),
            RawTensor(b + "attn_output.weight", (q, n_embd), T.Q8_0, 0),
            RawTensor(b + "attn_output.bias", (n_embd,), T.F32, 0),
            RawTensor(b + "attn_sinks.weight", (n_head,), T.F32, 0),
            RawTensor(b + "post_attention_norm.weight", (n_embd,), T.F32, 0),
            RawTensor(b + "ffn_gate_inp.weight", (n_embd, n_expert), T.F32, 0),
            RawTensor(b + "ffn_gate_inp.bias", (n_expert,), T.F32, 0),
            RawTensor(b + "ffn_gate_exps.weight", (n_embd, ff, n_expert), T.MXFP4, 0),
            RawTensor(b + "ffn_gate_exps.bias", (ff, n_expert), T.F32, 0),
            RawTensor(b + "ffn_up_exps.weight", (n_embd, ff, n_expert), T.MXFP4, 0),
            RawTensor(b + "ffn_up_exps.bias", (ff, n_expert), T.F32, 0),
            RawTensor(b + "ffn_down_exps.weight", (ff, n_embd, n_expert), T.MXFP4, 0),
            RawTensor(b + "ffn_down_exps.bias", (n_embd, n_expert), T.F32, 0),
        ]
    return summarize([Header(3, MappingProxyType(meta), tuple(tensors), 32, 0)], [f"/nonexistent/{name}.gguf"], 0)


@cache
def model(name: str, quant: str) -> ModelSummary:
    """The summary of one of the published rows' models."""
    key = (name, quant)
    if key == ("Qwen3-30B-A3B", "Q4_K_M"):
        return _qwen3moe(name, 48, 2048, 32, 4, 128, 8, 768, 40960)
    if key == ("Qwen3-235B-A22B", "Q4_K_M"):
        return _qwen3moe(name, 94, 4096, 64, 4, 128, 8, 1536, 40960)
    if key == ("gpt-oss-20b", "MXFP4"):
        return _gpt_oss(name, 24, 32)
    if key == ("gpt-oss-120b", "MXFP4"):
        return _gpt_oss(name, 36, 128)
    raise KeyError(f"no shape for {name} {quant}")


def rows() -> list[dict]:
    return json.loads(ROWS.read_text())["rows"]


def machine(row: dict) -> Hardware:
    """The machine a row describes, as `fit --vram V --gpu-bw G --cpu-bw R` (or `--gpu NAME`) makes it:
    the user's rated figures, nothing detected (this machine's CPU count and FLOP/s aside)."""
    base = Hardware(cpu_name="published", cpu_cores=int(row.get("cpu_cores", 8)), ram_total=512 * GiB,
                    ram_available=512 * GiB, cpu_bandwidth=20e9, cpu_flops=8 * hardware.CPU_GFLOPS_PER_CORE * 1e9)
    vram = row.get("vram")
    return hardware.with_overrides(base, vram=[vram] if vram else None, no_gpu=not vram,
                                   gpu_bw=row.get("gpu_bw_rated") if vram else None, cpu_bw=row["ram_bw_rated"])


def plan(row: dict) -> Plan:
    """The plan for the row's placement, priced as `fit --n-cpu-moe N --ngl L` would price it."""
    summary = model(row["model"], row["quant"])
    options = RunOptions(n_ctx=int(row.get("n_ctx", 4096)))
    hw = machine(row)
    if not row.get("vram"):
        return planner.plan_model(summary, hw, options, n_gpu_layers=0)
    return planner.plan_model(summary, hw, options, n_gpu_layers=row.get("ngl"), n_cpu_moe=row.get("n_cpu_moe"))
