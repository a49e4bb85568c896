"""Small GGUF models of real architectures, with random weights: the test bench for everything.

Each model has the tensor names, shapes and hyperparameter keys that the vendored llama.cpp's loader
expects for its architecture, a real byte-level BPE tokenizer and a ChatML chat template, so llama.cpp
loads it and generates (nonsense) text from it in a fraction of a second. The sizes are tiny (4 layers,
n_embd 256) but matrix rows are multiples of 256, so K-quants apply as they do to real models; the one
exception is DeepSeek's attn_k_b, whose rows are qk_nope_dim wide there too, and which llama.cpp
quantizes to a fallback type in both.

gguf and numpy are imported when a model is written, llama_cpp only when one is quantized or loaded.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import math
import os
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ARCHS: tuple[str, ...] = ("llama-dense", "llama-moe", "qwen2moe", "qwen3moe", "deepseek2", "gpt-oss", "qwen35moe",
                          "qwen3next", "glm4moe")
# Written on demand, not by build_all: llama4's compute buffers are close to llama.cpp's, not exact
EXTRA_ARCHS: tuple[str, ...] = ("llama4",)

# qtype -> the llama_ftype constant of llama-cpp-python that produces it
QUANT_FTYPES: dict[str, str] = {
    "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "q4_k": "LLAMA_FTYPE_MOSTLY_Q4_K_S",
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
}
DTYPES = ("f16", "f32")
DEFAULT_QUANTS = ("f16", "q8_0", "q4_k")  # what build_all writes, and what tests get as `models`

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
VOCAB_SIZE = 512  # 256 byte tokens + merges learned from _CORPUS + the special tokens
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# gguf's token types (gguf.TokenType), kept here so the vocabulary needs no import
_TOKEN_NORMAL, _TOKEN_CONTROL = 1, 3


@dataclass(frozen=True)
class Spec:
    """The hyperparameters of one test architecture, enough to work out every tensor shape by hand.

    ``head_dim`` is the attention head size as the GGUF keys state it; for MLA (deepseek2) the heads
    are described by ``qk_nope_dim + rope_dim`` (queries/keys) and ``v_head_dim`` (values) instead.
    """

    name: str  # our name for it, a key of SPECS
    arch: str  # general.architecture
    n_layer: int = 4
    n_embd: int = 256
    n_head: int = 4
    n_head_kv: int = 2
    head_dim: int = 64
    n_ff: int = 512  # feed_forward_length: dense FFN width (for llama-moe and gpt-oss, the experts')
    n_expert: int = 0
    n_expert_used: int = 0
    expert_ff: int = 0  # width of one routed expert
    n_expert_shared: int = 0
    shared_ff: int = 0  # width of the shared expert(s), all together
    leading_dense: int = 0  # first layers with a dense FFN instead of experts (deepseek2)
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_dim: int = 0
    rope_dim: int = 0  # rope.dimension_count; 0: the whole head
    v_head_dim: int = 0
    sliding_window: int = 0
    qkv_bias: bool = False
    qk_norm: bool = False
    expert_probs_bias: bool = False  # exp_probs_b: DeepSeek-V3's per-expert selection bias
    # gated delta net (qwen35moe's linear attention): head size, key heads, value heads, conv width,
    # and every attention_interval-th layer attends (the others are recurrent)
    ssm_state: int = 0
    ssm_groups: int = 0
    ssm_v_heads: int = 0
    ssm_conv: int = 0
    attention_interval: int = 0
    rope_sections: tuple[int, ...] = ()  # multimodal RoPE sections (qwen35moe)
    nextn: int = 0  # multi-token-prediction layers after the n_layer trunk layers (qwen35moe)
    n_vocab: int = VOCAB_SIZE
    context_length: int = 4096
    rope_freq_base: float = 10000.0
    tokenizer_pre: str = "default"
    expert_weights_scale: float = 2.5  # deepseek2 / glm4moe: the routed experts' output scale

    @property
    def is_moe(self) -> bool:
        return self.n_expert > 0

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(range(self.leading_dense, self.n_layer + self.nextn)) if self.is_moe else ()  # MTP too

    @property
    def recurrent_layers(self) -> tuple[int, ...]:
        n = self.attention_interval
        return tuple(il for il in range(self.n_layer) if (il + 1) % n) if n else ()


SPECS: dict[str, Spec] = {
    s.name: s
    for s in (
        Spec("llama-dense", "llama", n_ff=512, tokenizer_pre="llama-bpe", rope_freq_base=500000.0),
        # Mixtral: llama with experts; feed_forward_length is the width of one expert
        Spec("llama-moe", "llama", n_ff=256, n_expert=4, n_expert_used=2, expert_ff=256,
             tokenizer_pre="llama-bpe", rope_freq_base=1000000.0),
        # Qwen1.5-MoE: q/k/v biases, one shared expert behind a sigmoid gate (ffn_gate_inp_shexp)
        Spec("qwen2moe", "qwen2moe", n_head_kv=4, n_ff=512, n_expert=4, n_expert_used=2, expert_ff=256,
             n_expert_shared=1, shared_ff=512, qkv_bias=True, tokenizer_pre="qwen2", rope_freq_base=1000000.0),
        # Qwen3-30B-A3B: q/k norms, queries wider than the embedding
        Spec("qwen3moe", "qwen3moe", n_head=8, n_head_kv=2, n_ff=512, n_expert=6, n_expert_used=2, expert_ff=256,
             qk_norm=True, tokenizer_pre="qwen2", rope_freq_base=1000000.0),
        # DeepSeek-V3: MLA with both LoRA ranks, a leading dense layer, a shared expert, sigmoid routing
        # with a selection bias. Converted MLA is MQA over the compressed KV: one KV head of
        # kv_lora_rank + rope_dim for keys and kv_lora_rank for values.
        Spec("deepseek2", "deepseek2", n_head=4, n_head_kv=1, head_dim=0, n_ff=512, n_expert=4, n_expert_used=2,
             expert_ff=256, n_expert_shared=1, shared_ff=256, leading_dense=1, q_lora_rank=512, kv_lora_rank=256,
             qk_nope_dim=64, rope_dim=32, v_head_dim=64, expert_probs_bias=True, tokenizer_pre="deepseek-v3"),
        # gpt-oss: sliding-window attention on every other layer, attention sinks, biases everywhere
        Spec("gpt-oss", "gpt-oss", n_head=4, n_head_kv=2, n_ff=256, n_expert=4, n_expert_used=2, expert_ff=256,
             sliding_window=128, qkv_bias=True, tokenizer_pre="gpt-4o", rope_freq_base=150000.0),
        # Qwen3.5-35B-A3B: three gated-delta-net layers, then one attention layer with an output gate
        # (queries twice as wide) and q/k norms; a shared expert behind a sigmoid gate; mRoPE on a
        # quarter of the head
        Spec("qwen35moe", "qwen35moe", n_head=4, n_head_kv=2, n_ff=256, n_expert=6, n_expert_used=2,
             expert_ff=256, n_expert_shared=1, shared_ff=256, qk_norm=True, rope_dim=16, rope_sections=(3, 3, 2, 0),
             ssm_state=32, ssm_groups=4, ssm_v_heads=8, ssm_conv=4, attention_interval=4, tokenizer_pre="qwen2",
             rope_freq_base=10000000.0),
        # Qwen3-Next-80B-A3B: Qwen3.5's layout, but each delta-net layer projects q/k/v/z with one
        # matrix (ssm_in) and beta/alpha with another, and repeats key heads up to the value heads
        Spec("qwen3next", "qwen3next", n_head=4, n_head_kv=2, n_ff=256, n_expert=6, n_expert_used=2,
             expert_ff=256, n_expert_shared=1, shared_ff=256, qk_norm=True, rope_dim=16, ssm_state=32,
             ssm_groups=4, ssm_v_heads=8, ssm_conv=4, attention_interval=4, tokenizer_pre="qwen2",
             rope_freq_base=10000000.0),
        # GLM-4.5(-Air): q/k/v biases, RoPE on half the head, a leading dense layer, sigmoid routing
        # with a selection bias, one shared expert, an MTP layer llama.cpp leaves out
        # Llama 4 Scout: MoE on every layer (top-1, sigmoid) with a shared expert, attention in chunks
        # of 8192 tokens on three layers of four, no RoPE on the fourth (llama.cpp's defaults)
        Spec("llama4", "llama4", n_head=4, n_head_kv=2, n_ff=512, n_expert=4, n_expert_used=1, expert_ff=256,
             n_expert_shared=1, shared_ff=256, tokenizer_pre="llama-bpe", rope_freq_base=500000.0),
        Spec("glm4moe", "glm4moe", n_head=4, n_head_kv=2, n_ff=512, n_expert=4, n_expert_used=2, expert_ff=256,
             n_expert_shared=1, shared_ff=256, leading_dense=1, qkv_bias=True, rope_dim=32, expert_probs_bias=True,
             nextn=1, tokenizer_pre="qwen2", rope_freq_base=1000000.0),
    )
}
assert sorted(SPECS) == sorted(ARCHS + EXTRA_ARCHS)


# ---- tokenizer -------------------------------------------------------------------------------

_CORPUS = """
Hello! This is a small model of a real architecture, made for tests. It has random weights, so the
text it writes means nothing, but every tensor has the name and the shape that llama.cpp expects.
A mixture of experts sends each token through a few of its experts: the router scores all of them,
keeps the best two, and adds their outputs. The experts hold most of the weights, so a machine with a
small graphics card keeps them in system memory and the attention on the card. The user asks, the
assistant answers, and the system prompt sets the tone. Tokens are read one at a time; the cache keeps
the keys and values of the tokens seen so far. When the context grows, the cache grows with it.
We test the parser on every model, count the parameters, and check the totals against llama.cpp.
Quantized weights take fewer bits: eight, four, or a mix, and the layers that matter keep more.
What is the capital of France? Paris is the capital of France. How many experts are used per token?
Two of them, out of four, six or eight. Write a short poem about the sea. The sea is wide and the
wind is strong; the waves come in and the night is long. Thank you! You are welcome. Good morning,
good evening, and good night. The quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9 10.
"""

_WORD_RE = re.compile(r" ?[A-Za-z]+| ?[0-9]| ?[^\sA-Za-z0-9]+|\s+")


@functools.lru_cache(maxsize=1)
def _byte_chars() -> tuple[str, ...]:
    """GPT-2's reversible map from bytes to printable characters (byte-level BPE's alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return tuple(chars[b] for b in range(256))


@functools.lru_cache(maxsize=1)
def vocabulary() -> tuple[tuple[str, ...], tuple[int, ...], tuple[str, ...]]:
    """(tokens, token types, merges) of the test tokenizer: byte-level BPE trained on a fixed text.

    Deterministic: ties between equally frequent pairs go to the smaller pair.
    """
    byte_chars = _byte_chars()
    counts = Counter(tuple(byte_chars[b] for b in w.encode()) for w in _WORD_RE.findall(_CORPUS))
    words = [[list(symbols), n] for symbols, n in counts.items()]
    tokens = list(byte_chars)
    known = set(tokens)
    merges: list[str] = []
    target = VOCAB_SIZE - len(SPECIAL_TOKENS)
    while len(tokens) < target:
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols, n in words:
            for pair in itertools.pairwise(symbols):
                pairs[pair] += n
        if not pairs:
            raise RuntimeError("the tokenizer corpus is too small for the vocabulary size")
        a, b = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(f"{a} {b}")
        if a + b not in known:  # two merges may spell the same token; it gets one id
            known.add(a + b)
            tokens.append(a + b)
        for entry in words:
            symbols = entry[0]
            i, out = 0, []
            while i < len(symbols):
                if i + 1 < len(symbols) and symbols[i] == a and symbols[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            entry[0] = out
    types = [_TOKEN_NORMAL] * len(tokens) + [_TOKEN_CONTROL] * len(SPECIAL_TOKENS)
    return tuple(tokens) + SPECIAL_TOKENS, tuple(types), tuple(merges)


def special_token_id(text: str) -> int:
    return vocabulary()[0].index(text)


# ---- tensors ---------------------------------------------------------------------------------


def tensor_shapes(spec: Spec) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of the model as (name, shape in ggml order: shape[0] is the row length)."""
    e, v = spec.n_embd, spec.n_vocab
    out: list[tuple[str, tuple[int, ...]]] = [("token_embd.weight", (e, v)), ("output_norm.weight", (e,)),
                                               ("output.weight", (e, v))]
    recurrent = spec.recurrent_layers
    for il in range(spec.n_layer + spec.nextn):
        b = f"blk.{il}."
        if il >= spec.n_layer:  # an MTP layer: an attention block, its FFN, and what feeds it
            out += [(b + "nextn.eh_proj.weight", (2 * e, e)), (b + "nextn.enorm.weight", (e,)),
                    (b + "nextn.hnorm.weight", (e,))]
        out.append((b + "attn_norm.weight", (e,)))
        out += _delta_net(spec, b) if il in recurrent else _attention(spec, b)
        if spec.arch in ("gpt-oss", "qwen35moe", "qwen3next", "glm4moe"):
            out.append((b + "post_attention_norm.weight", (e,)))
        else:
            out.append((b + "ffn_norm.weight", (e,)))
        if not spec.is_moe or il < spec.leading_dense:
            out += [(b + "ffn_gate.weight", (e, spec.n_ff)), (b + "ffn_down.weight", (spec.n_ff, e)),
                    (b + "ffn_up.weight", (e, spec.n_ff))]
            continue
        n, ff = spec.n_expert, spec.expert_ff
        out.append((b + "ffn_gate_inp.weight", (e, n)))
        if spec.expert_probs_bias:
            out.append((b + "exp_probs_b.bias", (n,)))
        out += [(b + "ffn_gate_exps.weight", (e, ff, n)), (b + "ffn_down_exps.weight", (ff, e, n)),
                (b + "ffn_up_exps.weight", (e, ff, n))]
        if spec.arch == "gpt-oss":
            out += [(b + "ffn_gate_inp.bias", (n,)), (b + "ffn_gate_exps.bias", (ff, n)),
                    (b + "ffn_down_exps.bias", (e, n)), (b + "ffn_up_exps.bias", (ff, n))]
        if spec.shared_ff:
            sff = spec.shared_ff
            if spec.arch in ("qwen2moe", "qwen35moe", "qwen3next"):
                out.append((b + "ffn_gate_inp_shexp.weight", (e,)))
            out += [(b + "ffn_gate_shexp.weight", (e, sff)), (b + "ffn_down_shexp.weight", (sff, e)),
                    (b + "ffn_up_shexp.weight", (e, sff))]
    return out


def _attention(spec: Spec, b: str) -> list[tuple[str, tuple[int, ...]]]:
    e = spec.n_embd
    if spec.kv_lora_rank:  # MLA, as convert_hf_to_gguf writes it (kv_b split into k_b and v_b)
        qk = spec.qk_nope_dim + spec.rope_dim
        return [
            (b + "attn_q_a_norm.weight", (spec.q_lora_rank,)),
            (b + "attn_kv_a_norm.weight", (spec.kv_lora_rank,)),
            (b + "attn_q_a.weight", (e, spec.q_lora_rank)),
            (b + "attn_q_b.weight", (spec.q_lora_rank, spec.n_head * qk)),
            (b + "attn_kv_a_mqa.weight", (e, spec.kv_lora_rank + spec.rope_dim)),
            (b + "attn_k_b.weight", (spec.qk_nope_dim, spec.kv_lora_rank, spec.n_head)),
            (b + "attn_v_b.weight", (spec.kv_lora_rank, spec.v_head_dim, spec.n_head)),
            (b + "attn_output.weight", (spec.n_head * spec.v_head_dim, e)),
        ]
    q, kv = spec.n_head * spec.head_dim, spec.n_head_kv * spec.head_dim
    gate = q if spec.arch in ("qwen35moe", "qwen3next") else 0  # the output gate rides along with the queries
    out = [(b + "attn_q.weight", (e, q + gate)), (b + "attn_k.weight", (e, kv)), (b + "attn_v.weight", (e, kv)),
           (b + "attn_output.weight", (q, e))]
    if spec.qkv_bias:
        out += [(b + "attn_q.bias", (q,)), (b + "attn_k.bias", (kv,)), (b + "attn_v.bias", (kv,))]
    if spec.qk_norm:
        out += [(b + "attn_q_norm.weight", (spec.head_dim,)), (b + "attn_k_norm.weight", (spec.head_dim,))]
    if spec.arch == "gpt-oss":
        out += [(b + "attn_output.bias", (e,)), (b + "attn_sinks.weight", (spec.n_head,))]
    return out


def _delta_net(spec: Spec, b: str) -> list[tuple[str, tuple[int, ...]]]:
    """A gated delta net layer as llama.cpp's qwen35moe (or qwen3next) loader expects it."""
    e, v_heads = spec.n_embd, spec.ssm_v_heads
    key_dim, value_dim = spec.ssm_state * spec.ssm_groups, spec.ssm_state * v_heads
    conv_dim = 2 * key_dim + value_dim
    if spec.arch == "qwen3next":
        return [
            (b + "ssm_in.weight", (e, conv_dim + value_dim)), (b + "ssm_conv1d.weight", (spec.ssm_conv, conv_dim)),
            (b + "ssm_dt.bias", (v_heads,)), (b + "ssm_a", (v_heads,)), (b + "ssm_ba.weight", (e, 2 * v_heads)),
            (b + "ssm_norm.weight", (spec.ssm_state,)), (b + "ssm_out.weight", (value_dim, e)),
        ]
    return [
        (b + "attn_qkv.weight", (e, conv_dim)), (b + "attn_gate.weight", (e, value_dim)),
        (b + "ssm_conv1d.weight", (spec.ssm_conv, conv_dim)), (b + "ssm_dt.bias", (v_heads,)),
        (b + "ssm_a", (v_heads,)), (b + "ssm_beta.weight", (e, v_heads)), (b + "ssm_alpha.weight", (e, v_heads)),
        (b + "ssm_norm.weight", (spec.ssm_state,)), (b + "ssm_out.weight", (value_dim, e)),
    ]


def _keeps_f32(name: str, shape: tuple[int, ...]) -> bool:
    """Tensors convert_hf_to_gguf keeps in F32 whatever the output type: vectors, norms, routers, biases."""
    return len(shape) == 1 or name.endswith(("_norm.weight", "ffn_gate_inp.weight", "ssm_conv1d.weight")) or \
        not name.endswith(".weight")


# ---- writing ---------------------------------------------------------------------------------


def write_model(arch: str | Spec, path: str | os.PathLike[str], dtype: str = "f16", seed: int = 0,
                n_split: int = 1) -> Path:
    """Write the test model ``arch`` (a name in ARCHS, or a Spec) with random weights (F16 or F32
    matrices) to ``path``.

    With ``n_split > 1`` the model is written as that many shards, named as llama.cpp's gguf-split
    names them (``stem-00001-of-00003.gguf``); the path of the first shard is returned.
    """
    import numpy as np
    from gguf import GGUFWriter

    spec = _spec(arch)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    shapes = tensor_shapes(spec)
    per_shard = math.ceil(len(shapes) / n_split) if n_split > 1 else 0
    writer = GGUFWriter(path, spec.arch, split_max_tensors=per_shard)
    _write_metadata(writer, spec, dtype)
    rng = np.random.default_rng(seed)
    matrix_dtype = np.float16 if dtype == "f16" else np.float32
    for name, shape in shapes:
        dims = tuple(reversed(shape))  # numpy order: the row is the last axis
        if name.endswith("norm.weight"):
            data = np.ones(dims, dtype=np.float32)
        else:
            data = rng.standard_normal(dims, dtype=np.float32) * np.float32(0.02)
        if not _keeps_f32(name, shape):
            data = data.astype(matrix_dtype)
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if n_split > 1:
        first = path.with_name(f"{path.stem}-00001-of-{n_split:05d}.gguf")
        if not first.is_file():  # GGUFWriter chose another shard count
            raise RuntimeError(f"writing {arch} as {n_split} shards did not give {first.name}")
        return first
    return path


def write_header_only(spec: Spec, path: str | os.PathLike[str], qtype: str = "q8_0") -> Path:
    """A model of ``spec``'s shape with no weights: its header, then a hole the size of the data.

    The file is sparse (a few MB on disk whatever its size), so a real-sized shape (``spec`` with
    the dimensions of a published model, see dataclasses.replace) costs nothing to make. llama.cpp
    reads its header and plans its memory with no_alloc (measure.py); it cannot generate. Matrices
    are ``qtype`` (q8_0, q4_k or f16), vectors, norms and routers F32, as in a converted model.
    """
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter

    matrix_type = {"q8_0": GGMLQuantizationType.Q8_0, "f16": GGMLQuantizationType.F16,
                   "q4_k": GGMLQuantizationType.Q4_K}[qtype]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = GGUFWriter(path, spec.arch)
    _write_metadata(writer, spec, "f16")
    data = 0
    for name, shape in tensor_shapes(spec):
        kind = GGMLQuantizationType.F32 if _keeps_f32(name, shape) else matrix_type
        block, size = GGML_QUANT_SIZES[kind]
        dims = tuple(reversed(shape))  # numpy order, the row last, given in bytes for raw types
        row = shape[0] // block * size
        nbytes = row * math.prod(shape[1:])
        writer.add_tensor_info(name, dims[:-1] + (row,), np.dtype(np.uint8), nbytes, raw_dtype=kind)
        data += -(-nbytes // writer.data_alignment) * writer.data_alignment
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    header = path.stat().st_size
    start = -(-header // writer.data_alignment) * writer.data_alignment
    os.truncate(path, start + data)
    return path


def _write_metadata(w: Any, spec: Spec, dtype: str) -> None:
    _write_hparams(w, spec, dtype)
    tokens, types, merges = vocabulary()
    pad = max(0, spec.n_vocab - len(tokens))  # a real-sized vocabulary (write_header_only): filler tokens
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(spec.tokenizer_pre)
    w.add_token_list(list(tokens) + [f"<|filler_{i}|>" for i in range(pad)])
    w.add_token_types(list(types) + [_TOKEN_NORMAL] * pad)
    w.add_token_merges(list(merges))
    w.add_bos_token_id(special_token_id("<|endoftext|>"))
    w.add_eos_token_id(special_token_id("<|im_end|>"))
    w.add_pad_token_id(special_token_id("<|endoftext|>"))
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML_TEMPLATE)


def _write_hparams(w: Any, spec: Spec, dtype: str, name: str | None = None) -> None:
    """The hyperparameter keys of ``spec``'s architecture (everything but the tokenizer); also what
    moelocal.scripted writes under its own vocabulary."""
    from gguf import ExpertGatingFuncType

    w.add_name(name or f"moelocal test {spec.name}")
    w.add_file_type(1 if dtype == "f16" else 0)  # llama_ftype: MOSTLY_F16 / ALL_F32
    w.add_context_length(spec.context_length)
    w.add_embedding_length(spec.n_embd)
    w.add_block_count(spec.n_layer + spec.nextn)
    if spec.nextn:
        w.add_nextn_predict_layers(spec.nextn)
    w.add_feed_forward_length(spec.n_ff)
    w.add_head_count(spec.n_head)
    w.add_head_count_kv(spec.n_head_kv)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(spec.rope_freq_base)
    if spec.arch in ("llama", "deepseek2"):
        w.add_vocab_size(spec.n_vocab)
    if spec.kv_lora_rank:
        w.add_q_lora_rank(spec.q_lora_rank)
        w.add_kv_lora_rank(spec.kv_lora_rank)
        w.add_key_length(spec.kv_lora_rank + spec.rope_dim)
        w.add_value_length(spec.kv_lora_rank)
        w.add_key_length_mla(spec.qk_nope_dim + spec.rope_dim)
        w.add_value_length_mla(spec.v_head_dim)
        w.add_rope_dimension_count(spec.rope_dim)
    elif spec.arch == "llama":
        w.add_rope_dimension_count(spec.rope_dim or spec.head_dim)
    elif spec.arch in ("qwen3moe", "gpt-oss", "qwen35moe", "qwen3next", "glm4moe"):
        w.add_key_length(spec.head_dim)
        w.add_value_length(spec.head_dim)
    if spec.attention_interval or spec.arch == "glm4moe":  # RoPE on part of the head
        w.add_rope_dimension_count(spec.rope_dim)
    if spec.rope_sections:
        w.add_rope_dimension_sections(list(spec.rope_sections))
    if spec.attention_interval:
        w.add_full_attention_interval(spec.attention_interval)
        w.add_ssm_conv_kernel(spec.ssm_conv)
        w.add_ssm_state_size(spec.ssm_state)
        w.add_ssm_group_count(spec.ssm_groups)
        w.add_ssm_time_step_rank(spec.ssm_v_heads)
        w.add_ssm_inner_size(spec.ssm_state * spec.ssm_v_heads)
    if spec.is_moe:
        w.add_expert_count(spec.n_expert)
        w.add_expert_used_count(spec.n_expert_used)
        if spec.arch != "llama":  # Mixtral states the expert width as feed_forward_length
            w.add_expert_feed_forward_length(spec.expert_ff)
    if spec.arch in ("qwen2moe", "qwen35moe", "qwen3next"):
        w.add_expert_shared_feed_forward_length(spec.shared_ff)
    if spec.arch == "llama4":
        w.add_interleave_moe_layer_step(1)
    if spec.arch in ("deepseek2", "glm4moe"):
        w.add_leading_dense_block_count(spec.leading_dense)
        w.add_expert_shared_count(spec.n_expert_shared)
        w.add_expert_weights_scale(spec.expert_weights_scale)
        w.add_expert_weights_norm(True)
        w.add_expert_gating_func(ExpertGatingFuncType.SIGMOID)
    if spec.sliding_window:
        w.add_sliding_window(spec.sliding_window)


def _spec(arch: str | Spec) -> Spec:
    if isinstance(arch, Spec):
        return arch
    try:
        return SPECS[arch]
    except KeyError:
        raise ValueError(f"unknown test architecture {arch!r}; choose from {', '.join(SPECS)}") from None


# ---- quantizing and loading (llama.cpp) ------------------------------------------------------


def quantize(src: str | os.PathLike[str], dst: str | os.PathLike[str], qtype: str, n_threads: int = 2) -> Path:
    """Quantize ``src`` to ``dst`` with llama.cpp's own quantizer (``llama_model_quantize``)."""
    import llama_cpp

    if qtype not in QUANT_FTYPES:
        raise ValueError(f"qtype must be one of {', '.join(QUANT_FTYPES)}, not {qtype!r}")
    dst = Path(dst)
    tmp = dst.with_name(dst.name + ".partial")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANT_FTYPES[qtype])
    params.nthread = n_threads
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
    if rc != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"llama.cpp could not quantize {src} to {qtype} (code {rc})")
    os.replace(tmp, dst)
    return dst


def build_all(directory: str | os.PathLike[str], quants: Sequence[str] = DEFAULT_QUANTS,
              archs: Sequence[str] = ARCHS) -> dict[str, Path]:
    """Every test model in every type asked for, as ``{"qwen3moe-q4_k": path, ...}``.

    Files that already exist are kept. Quantized models are made from the F16 one, which is written
    even when "f16" is not asked for.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    for arch in archs:
        for q in quants:
            path = directory / f"{arch}-{q}.gguf"
            if not path.is_file():
                if q in DTYPES:
                    tmp = write_model(arch, path.with_name(path.name + ".partial.gguf"), dtype=q)
                    os.replace(tmp, path)
                else:
                    src = directory / f"{arch}-f16.gguf"
                    if not src.is_file():
                        os.replace(write_model(arch, src.with_name(src.name + ".partial.gguf")), src)
                    quantize(src, path, q)
            out[f"{arch}-{q}"] = path
    return out


@dataclass
class Loaded:
    """A model and context loaded through llama.cpp's low-level API (the pointers are ctypes handles)."""

    model: Any
    ctx: Any
    vocab: Any
    n_vocab: int

    def tokenize(self, text: str, special: bool = True) -> list[int]:
        import llama_cpp

        raw = text.encode()
        buf = (llama_cpp.llama_token * (len(raw) + 8))()
        n = llama_cpp.llama_tokenize(self.vocab, raw, len(raw), buf, len(buf), False, special)
        if n < 0:
            raise RuntimeError(f"tokenizing {text!r} failed ({n})")
        return list(buf[:n])

    def detokenize(self, tokens: Sequence[int]) -> str:
        import llama_cpp

        buf = ctypes.create_string_buffer(256)
        pieces = []
        for token in tokens:
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, True)
            if n < 0:
                raise RuntimeError(f"token {token} has no text ({n})")
            pieces.append(buf.raw[:n])
        return b"".join(pieces).decode("utf-8", errors="replace")

    def decode(self, tokens: Sequence[int]) -> list[float]:
        """Run ``tokens`` as one batch; the logits of the last one."""
        import llama_cpp

        arr = (llama_cpp.llama_token * len(tokens))(*tokens)
        rc = llama_cpp.llama_decode(self.ctx, llama_cpp.llama_batch_get_one(arr, len(tokens)))
        if rc != 0:
            raise RuntimeError(f"llama_decode failed ({rc})")
        logits = llama_cpp.llama_get_logits_ith(self.ctx, -1)
        return logits[: self.n_vocab]

    def generate(self, prompt: str, n_predict: int = 4) -> list[int]:
        """Greedy generation: decode the prompt as one batch, then ``n_predict`` tokens one by one."""
        logits = self.decode(self.tokenize(prompt))
        out: list[int] = []
        for _ in range(n_predict):
            if not all(math.isfinite(x) for x in logits):
                raise RuntimeError("llama.cpp returned logits that are not finite")
            token = max(range(self.n_vocab), key=logits.__getitem__)
            out.append(token)
            logits = self.decode([token])
        return out


@contextmanager
def load(path: str | os.PathLike[str], n_ctx: int = 256, n_threads: int = 1) -> Iterator[Loaded]:
    """Load a model on the CPU with llama.cpp's low-level API, freeing it on exit.

    ``use_extra_bufts`` is off: with it, this llama.cpp puts quantized weights in the AMX buffer type
    on CPUs that have AMX and then crashes on batches of two tokens or more.
    """
    import llama_cpp

    llama_cpp.llama_backend_init()
    mparams = llama_cpp.llama_model_default_params()
    mparams.use_extra_bufts = False
    mparams.n_gpu_layers = 0
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), mparams)
    if not model:
        raise RuntimeError(f"llama.cpp could not load {path}")
    ctx = None
    try:
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = n_ctx
        cparams.n_ubatch = n_ctx
        cparams.n_threads = n_threads
        cparams.n_threads_batch = n_threads
        ctx = llama_cpp.llama_init_from_model(model, cparams)
        if not ctx:
            raise RuntimeError(f"llama.cpp could not make a context for {path}")
        vocab = llama_cpp.llama_model_get_vocab(model)
        yield Loaded(model, ctx, vocab, llama_cpp.llama_vocab_n_tokens(vocab))
    finally:
        if ctx:
            llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(model)
