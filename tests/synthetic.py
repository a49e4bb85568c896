"""Model summaries of real-sized models built from header data alone (no file, no weights).

The planner is a pure function of a summary and a machine, so a 30B MoE model can be planned for a
24 GiB GPU in a test on a laptop with neither.
"""

from __future__ import annotations

from types import MappingProxyType

from gguf.constants import GGMLQuantizationType as T

from moelocal.gguf_model import Header, RawTensor, summarize


def qwen3moe_summary(
    n_layer: int = 48,
    n_embd: int = 2048,
    n_expert: int = 128,
    n_used: int = 8,
    expert_ff: int = 768,
    n_head: int = 32,
    n_head_kv: int = 4,
    head_dim: int = 128,
    n_vocab: int = 151936,
    expert_type: int = T.Q4_K,
    dense_type: int = T.Q6_K,
    context_length: int = 40960,
    name: str = "Qwen3-30B-A3B (synthetic)",
):
    """A summary shaped like Qwen3-30B-A3B: 48 layers, 128 experts, 8 used."""
    arch = "qwen3moe"
    meta = {
        "general.architecture": arch,
        "general.name": name,
        f"{arch}.block_count": n_layer,
        f"{arch}.embedding_length": n_embd,
        f"{arch}.attention.head_count": n_head,
        f"{arch}.attention.head_count_kv": n_head_kv,
        f"{arch}.attention.key_length": head_dim,
        f"{arch}.attention.value_length": head_dim,
        f"{arch}.context_length": context_length,
        f"{arch}.expert_count": n_expert,
        f"{arch}.expert_used_count": n_used,
        f"{arch}.expert_feed_forward_length": expert_ff,
        f"{arch}.vocab_size": n_vocab,
    }
    tensors = [
        RawTensor("token_embd.weight", (n_embd, n_vocab), dense_type, 0),
        RawTensor("output_norm.weight", (n_embd,), T.F32, 0),
        RawTensor("output.weight", (n_embd, n_vocab), dense_type, 0),
    ]
    for il in range(n_layer):
        b = f"blk.{il}."
        tensors += [
            RawTensor(b + "attn_norm.weight", (n_embd,), T.F32, 0),
            RawTensor(b + "attn_q.weight", (n_embd, n_head * head_dim), dense_type, 0),
            RawTensor(b + "attn_k.weight", (n_embd, n_head_kv * head_dim), dense_type, 0),
            RawTensor(b + "attn_v.weight", (n_embd, n_head_kv * head_dim), dense_type, 0),
            RawTensor(b + "attn_output.weight", (n_head * head_dim, n_embd), dense_type, 0),
            RawTensor(b + "attn_q_norm.weight", (head_dim,), T.F32, 0),
            RawTensor(b + "attn_k_norm.weight", (head_dim,), T.F32, 0),
            RawTensor(b + "ffn_norm.weight", (n_embd,), T.F32, 0),
            RawTensor(b + "ffn_gate_inp.weight", (n_embd, n_expert), T.F32, 0),
            RawTensor(b + "ffn_gate_exps.weight", (n_embd, expert_ff, n_expert), expert_type, 0),
            RawTensor(b + "ffn_up_exps.weight", (n_embd, expert_ff, n_expert), expert_type, 0),
            RawTensor(b + "ffn_down_exps.weight", (expert_ff, n_embd, n_expert), expert_type, 0),
        ]
    header = Header(3, MappingProxyType(meta), tuple(tensors), 32, 0)
    return summarize([header], [f"/nonexistent/{name}.gguf"], 0)
