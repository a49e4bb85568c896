"""Bytes per device for a placement: weights, KV cache, compute buffers, output buffer, overhead.

Pure functions of a ModelSummary, a Placement and RunOptions; no I/O, no llama_cpp. Every rule below
is the one the vendored llama.cpp (llama-cpp-python 0.3.36) applies (llama-kv-cache.cpp,
llama-memory-recurrent.cpp, llama-graph.cpp, models/*.cpp, ggml-alloc.c, ggml-backend.cpp).
``measure.py`` gets the same figures from llama.cpp itself.

- **weights**: exact tensor bytes, placed by :mod:`moelocal.layout` (the one place that applies
  ``-ngl``, ``--n-cpu-moe`` and ``tensor_split``).
- **KV cache**: llama.cpp's padded context (multiples of 256 cells per sequence), one stream per
  sequence, K and V rows per layer (GQA head counts, MLA's single latent K row and no V, iSWA's
  smaller cache for sliding-window layers), in the KV type's block size. Exact.
- **recurrent state** (hybrid and recurrent models): conv + SSM state per layer and sequence
  (Mamba-style hyperparameters, which Qwen3.5's gated delta nets use too), in F32; counted with
  the KV cache. Exact for Qwen3.5.
- **output**: the logits buffer, ``n_vocab * n_seq`` floats at context creation. Exact.
- **compute**: llama.cpp reserves its compute buffer by allocating the worst-case graph (one
  ubatch of ``min(n_ctx, n_ubatch)`` tokens against the full cache) with ggml-alloc. We rebuild
  that graph's tensors (:func:`_build_graph`) and run the same allocator (:class:`_Allocator`).
  For llama (dense and Mixtral-style MoE), qwen2moe, qwen3moe, deepseek2 (MLA), gpt-oss,
  glm4moe, qwen35moe and qwen3next (hybrids of gated delta nets and gated attention) this matches
  llama.cpp's CPU compute buffer to the byte, at any context, ubatch, sequence count, KV type and
  flash-attention setting; see :func:`compute_bytes` for what is approximate.
- **overhead**: a fixed allowance per GPU backend for what llama.cpp never reports (driver
  context, library workspaces), see :data:`BACKEND_OVERHEAD`.
- **llama.cpp's own figures** (:class:`Reference`, from its dry run: oracle.py): where given,
  :func:`estimate` bills llama.cpp's KV cache, recurrent state and compute buffer instead of its
  own wherever the two differ, and spreads them over devices as :func:`estimate` says.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

from moelocal import layout
from moelocal.gguf_model import ModelSummary
from moelocal.plan import CPU, DeviceMemory, Placement, RunOptions

MiB = 1 << 20
GiB = 1 << 30

# ggml type traits of the KV cache types: (elements per block, bytes per block)
KV_TYPE_BLOCKS: dict[str, tuple[int, int]] = {
    "f32": (1, 4), "f16": (1, 2), "bf16": (1, 2), "q8_0": (32, 34), "q4_0": (32, 18), "q4_1": (32, 20),
    "q5_0": (32, 22), "q5_1": (32, 24), "iq4_nl": (32, 18),
}
_QUANTIZED_KV = {"q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl"}

# What a GPU backend takes beyond the buffers llama.cpp reports, per device. CUDA: the primary
# context with lazy module loading (~250-350 MiB on recent drivers, more on older ones), cuBLAS and
# its workspace (~30-70 MiB), and the pool llama.cpp's CUDA backend grows for temporary buffers
# during prompt processing; 512 MiB covers those on the cards we know of without being wasteful on
# an 8 GiB card. ROCm's runtime is heavier. Metal shares RAM with the CPU and reports its buffers.
# These are allowances, not measurements: this llama.cpp has no way to report them.
BACKEND_OVERHEAD: dict[str, int] = {
    "cuda": 512 * MiB,
    "rocm": 768 * MiB,
    "hip": 768 * MiB,
    "vulkan": 384 * MiB,
    "sycl": 512 * MiB,
    "metal": 128 * MiB,
    "rpc": 0,
    "cpu": 0,
}


def backend_overhead(backend: str) -> int:
    """BACKEND_OVERHEAD of ``backend``; a backend not in the table is charged as CUDA."""
    return BACKEND_OVERHEAD.get(backend.lower(), BACKEND_OVERHEAD["cuda"])

# Alignment of a buffer type's allocations: ggml's CPU buffers (TENSOR_ALIGNMENT), CUDA's (128).
_ALIGN = {"cpu": 32, "cuda": 128}


def safety_margin(total: int, fraction: float = 0.05, minimum: int = 256 * MiB) -> int:
    """Bytes to keep free on a device on top of an estimate: a share of it, at least ``minimum``.

    The estimate is exact for what llama.cpp allocates; the margin is for what it does not report
    (allocator fragmentation in the driver, other processes, the runtime's own growth).
    """
    return max(minimum, int(total * fraction))


# ---- llama.cpp's context sizes ---------------------------------------------------------------


def _pad(x: int, n: int) -> int:
    return -(-x // n) * n


@dataclass(frozen=True)
class ContextSizes:
    """The sizes llama.cpp derives from the requested context (llama-context.cpp's constructor)."""

    n_ctx: int  # all cells, after rounding
    n_ctx_seq: int  # cells per sequence: each sequence has a stream of its own
    n_stream: int
    n_batch: int
    n_ubatch: int
    n_tokens: int  # tokens of the worst-case graph llama.cpp reserves compute memory for
    n_seqs: int
    n_outputs: int  # outputs (logit rows) of that graph


def context_sizes(options: RunOptions, n_ctx_train: int = 0) -> ContextSizes:
    """llama.cpp's rounding of the context, for the engine's settings (``kv_unified = False``).

    n_ctx is padded to 256, then split per sequence and each share padded to 256 again; the batch
    is capped by the context and the ubatch by the batch; the reserved graph has
    ``min(n_ctx, n_ubatch)`` tokens (rounded up to a multiple of the sequences) and as many outputs.
    """
    n_seq = max(1, options.n_seq)
    n_ctx = options.n_ctx if options.n_ctx > 0 else n_ctx_train
    n_ctx = _pad(max(n_ctx, 1), 256)
    n_ctx_seq = max(_pad(n_ctx // n_seq, 256), 256)
    n_ctx = n_ctx_seq * n_seq
    n_batch = min(n_ctx, max(options.n_batch, options.n_ubatch))
    n_ubatch = min(n_batch, max(options.n_ubatch, 1))
    n_tokens = min(n_ctx, n_ubatch)
    n_outputs = min(n_tokens, n_batch)
    if n_tokens % n_seq:
        n_tokens = _pad(n_tokens, n_seq)
    return ContextSizes(n_ctx, n_ctx_seq, n_seq, n_batch, n_ubatch, n_tokens, n_seq, n_outputs)


# ---- what the memory model needs to know about a model ---------------------------------------


@dataclass(frozen=True)
class _Layer:
    n_head: int
    n_head_kv: int
    swa: bool
    recurrent: bool
    ffn: str  # "dense" | "moe" | "none"
    n_ff: int  # dense FFN width, or one expert's
    n_ff_shexp: int = 0
    shexp_gate: bool = False  # qwen2moe, qwen35moe, qwen3next: a sigmoid gate in front of the shared expert
    q_bias: bool = False
    k_bias: bool = False
    v_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    fused_qkv: bool = False
    router_bias: bool = False
    expert_bias: bool = False  # gpt-oss: biases on the experts (ADD_ID)
    probs_bias: bool = False  # deepseek-v3: exp_probs_b
    fused_gate_up: bool = False


@dataclass(frozen=True)
class _Model:
    """The shape of a model, as far as memory goes; built once per summary (see :func:`_model`)."""

    arch: str
    n_layer: int  # layers that run (nextn/MTP layers excluded)
    n_embd: int
    n_vocab: int
    head_k: int
    head_v: int
    layers: tuple[_Layer, ...]
    n_expert: int = 0
    n_expert_used: int = 0
    gating: str = "softmax"  # softmax | sigmoid | softmax_weight
    norm_w: bool = False
    w_scale: float = 0.0
    mla: bool = False
    q_lora: int = 0
    kv_lora: int = 0
    rope_dim: int = 0
    head_k_mla: int = 0
    head_v_mla: int = 0
    sliding_window: int = 0
    out_rows_late: bool = False  # gpt-oss selects the output rows after the last layer
    out_rows_after_norm: bool = False  # Qwen3.5 selects them after the output norm
    n_pos: int = 1
    d_conv: int = 0
    d_inner: int = 0
    d_state: int = 0
    n_group: int = 0
    n_v_heads: int = 0  # gated delta nets: value heads (ssm.time_step_rank)
    ssm_in: bool = False  # Qwen3-Next's fused q/k/v/z projection (ssm_in) instead of attn_qkv + attn_gate
    no_rope_step: int = 0  # Llama 4: every n-th layer attends without RoPE (its queries scaled instead)
    kq_norm: bool = False  # Llama 4: weightless RMS norm of Q and K after RoPE
    exact: bool = True  # the compute graph of this architecture is modelled node for node

    @functools.cached_property
    def _hash(self) -> int:  # computed once: _Model is the key of the compute caches
        return hash((self.arch, self.n_layer, self.n_embd, self.n_vocab, self.layers))

    def __hash__(self) -> int:
        return self._hash


_EXACT_ARCHS = {"llama", "qwen2", "qwen3", "qwen2moe", "qwen3moe", "deepseek2", "gpt-oss", "qwen35moe", "qwen3next",
                "glm4moe"}
# Architectures whose recurrent layers are Qwen3.5's gated delta nets (models/qwen35*.cpp)
_DELTA_NET_ARCHS = {"qwen35", "qwen35moe", "qwen3next"}
# Architectures whose norm before the FFN is stored as post_attention_norm (not ffn_norm)
_POST_ATTN_NORM = {"gpt-oss", "qwen35", "qwen35moe", "qwen3next", "glm4moe"}
_NORM_W = {"llama": True, "qwen3moe": True, "qwen3vlmoe": True, "qwen35moe": True, "qwen3next": True,
           "qwen2moe": False, "gpt-oss": False}


_MODELS: dict[int, tuple[ModelSummary, _Model]] = {}


def _model(summary: ModelSummary) -> _Model:
    """The memory model's view of ``summary``, built once per summary object (hashing a summary
    means hashing every tensor of it: too slow for the planner's hundred calls)."""
    hit = _MODELS.get(id(summary))
    if hit is not None and hit[0] is summary:
        return hit[1]
    if len(_MODELS) > 64:
        _MODELS.clear()
    model = _build_model(summary)
    _MODELS[id(summary)] = (summary, model)
    return model


def _build_model(summary: ModelSummary) -> _Model:
    names = {t.name: t for t in summary.tensors}
    arch = summary.architecture
    nextn = int(summary.meta("nextn_predict_layers", 0) or 0)
    n_layer = summary.n_layer - nextn if 0 < nextn < summary.n_layer else summary.n_layer
    recurrent = set(summary.recurrent_layers)
    layers = []
    for il in range(n_layer):
        b = f"blk.{il}."

        def has(part: str, b: str = b) -> bool:
            return b + part in names

        def width(part: str, b: str = b) -> int:
            t = names.get(b + part)
            return t.shape[0] if t is not None else 0

        if has("ffn_gate_inp.weight") or has("ffn_down_exps.weight"):
            ffn, n_ff = "moe", width("ffn_down_exps.weight") or summary.expert_ff
        elif has("ffn_down.weight"):
            ffn, n_ff = "dense", width("ffn_down.weight")
        else:
            ffn, n_ff = "none", 0
        layers.append(_Layer(
            n_head=summary.n_head[il], n_head_kv=summary.n_head_kv[il],
            swa=bool(summary.swa_layers[il]) if il < len(summary.swa_layers) else False,
            recurrent=il in recurrent, ffn=ffn, n_ff=n_ff,
            n_ff_shexp=width("ffn_down_shexp.weight"), shexp_gate=has("ffn_gate_inp_shexp.weight"),
            q_bias=has("attn_q.bias"), k_bias=has("attn_k.bias"), v_bias=has("attn_v.bias"),
            o_bias=has("attn_output.bias"), qk_norm=has("attn_q_norm.weight"), fused_qkv=has("attn_qkv.weight"),
            router_bias=has("ffn_gate_inp.bias"), expert_bias=has("ffn_down_exps.bias"),
            probs_bias=has("exp_probs_b.bias"), fused_gate_up=has("ffn_gate_up_exps.weight"),
        ))
    key_mla = int(summary.meta("attention.key_length_mla", 0) or 0)
    value_mla = int(summary.meta("attention.value_length_mla", 0) or 0)
    gating_func = int(summary.meta("expert_gating_func", 0) or 0)
    gating = {2: "sigmoid", 3: "softmax_weight"}.get(gating_func, "softmax")
    if arch == "gpt-oss":
        gating = "softmax_weight"
    elif arch in ("glm4moe", "llama4") and not gating_func:  # their graphs' default (models/*.cpp)
        gating = "sigmoid"
    norm_w = _NORM_W.get(arch, bool(summary.meta("expert_weights_norm", False)))
    w_scale = float(summary.meta("expert_weights_scale", 0.0) or 0.0)
    rope_sections = summary.meta("rope.dimension_sections")
    out_vocab = names.get("output.weight") or names.get("token_embd.weight")
    return _Model(
        arch=arch, n_layer=n_layer, n_embd=summary.n_embd,
        n_vocab=out_vocab.shape[1] if out_vocab is not None and len(out_vocab.shape) > 1 else summary.n_vocab,
        head_k=summary.head_dim_k, head_v=summary.head_dim_v, layers=tuple(layers),
        n_expert=summary.n_expert, n_expert_used=summary.n_expert_used, gating=gating, norm_w=norm_w,
        w_scale=w_scale, mla=bool(key_mla and value_mla), q_lora=summary.q_lora_rank, kv_lora=summary.kv_lora_rank,
        rope_dim=summary.rope_dim, head_k_mla=key_mla, head_v_mla=value_mla,
        sliding_window=summary.sliding_window if any(summary.swa_layers) else 0,
        out_rows_late=arch == "gpt-oss" or arch in _DELTA_NET_ARCHS, out_rows_after_norm=arch in _DELTA_NET_ARCHS,
        n_pos=4 if isinstance(rope_sections, list) else 1,
        d_conv=int(summary.meta("ssm.conv_kernel", 0) or 0), d_inner=int(summary.meta("ssm.inner_size", 0) or 0),
        d_state=int(summary.meta("ssm.state_size", 0) or 0), n_group=int(summary.meta("ssm.group_count", 0) or 0),
        n_v_heads=int(summary.meta("ssm.time_step_rank", 0) or 0),
        ssm_in=any(t.name.endswith(".ssm_in.weight") for t in summary.tensors),
        # models/llama4.cpp: NoPE every 4th layer with chunked attention, else only the last layer;
        # the Q/K norm for all but the 128-expert model
        no_rope_step=(4 if any(summary.swa_layers) else n_layer) if arch == "llama4" else 0,
        kq_norm=arch == "llama4" and summary.n_expert != 128,
        exact=arch in _EXACT_ARCHS and (not recurrent or arch in _DELTA_NET_ARCHS),
    )


# ---- KV cache --------------------------------------------------------------------------------


def row_bytes(kv_type: str, n: int) -> int:
    """Bytes of a row of ``n`` elements of a KV cache type (ggml_row_size)."""
    try:
        blk, size = KV_TYPE_BLOCKS[kv_type]
    except KeyError:
        raise ValueError(f"unknown KV cache type {kv_type!r}; use one of {', '.join(KV_TYPE_BLOCKS)}") from None
    return n // blk * size


def swa_cells(summary: ModelSummary, options: RunOptions) -> int:
    """Cells per stream of the sliding-window cache (llama-kv-cache-iswa.cpp): the window plus one
    ubatch, padded to 256, at most the full cache; with ``options.swa_full`` the full cache."""
    s = context_sizes(options, summary.context_length)
    if options.swa_full or not summary.sliding_window:
        return s.n_ctx_seq
    return _pad(min(s.n_ctx_seq, summary.sliding_window + s.n_ubatch), 256)


def kv_bytes_by_layer(summary: ModelSummary, options: RunOptions) -> tuple[int, ...]:
    """KV cache (or recurrent state) bytes of each layer, as llama.cpp allocates them.

    K is ``n_head_kv * head_dim_k`` wide per cell (for MLA: the latent plus the rope part, one
    "head"); V likewise, except MLA (V is read out of K) and, without flash attention, V is
    transposed and every layer's row is as wide as the widest. ``options.swa_full``
    mirrors llama_context_params.swa_full, which the engine sets from it.
    """
    m = _model(summary)
    s = context_sizes(options, summary.context_length)
    cells_swa = swa_cells(summary, options)
    v_trans = not options.flash_attn
    v_max = max((ly.n_head_kv * m.head_v for ly in m.layers if not ly.recurrent), default=0)
    out = []
    for il in range(summary.n_layer):
        if il >= m.n_layer:
            out.append(0)  # nextn/MTP layers: not loaded, no cache
            continue
        ly = m.layers[il]
        if ly.recurrent:
            out.append(_recurrent_bytes(m, s.n_seqs))
            continue
        cells = (cells_swa if ly.swa else s.n_ctx_seq) * s.n_stream
        k = _pad(row_bytes(options.kv_type, ly.n_head_kv * m.head_k) * cells, _ALIGN["cpu"])
        v_row = 0 if m.mla else (v_max if v_trans else ly.n_head_kv * m.head_v)
        v = _pad(row_bytes(options.kv_type, v_row) * cells, _ALIGN["cpu"])
        out.append(k + v)
    return tuple(out)


def _recurrent_bytes(m: _Model, n_seq: int) -> int:
    """One layer's recurrent state (llama-memory-recurrent.cpp), Mamba-style hyperparameters."""
    n_embd_r = max(m.d_conv - 1, 0) * (m.d_inner + 2 * m.n_group * m.d_state)
    n_embd_s = m.d_state * m.d_inner
    return (n_embd_r + n_embd_s) * 4 * max(1, n_seq)


def kv_bytes_per_token(summary: ModelSummary, layer: int, kv_type: str = "f16") -> float:
    """Bytes one token adds to one layer's cache (K and V; 0 for recurrent layers)."""
    m = _model(summary)
    if layer >= m.n_layer or m.layers[layer].recurrent:
        return 0.0
    ly = m.layers[layer]
    v = 0 if m.mla else ly.n_head_kv * m.head_v
    blk, size = KV_TYPE_BLOCKS[kv_type]
    return (ly.n_head_kv * m.head_k + v) * size / blk


# ---- output buffer ---------------------------------------------------------------------------


def output_bytes(summary: ModelSummary, options: RunOptions) -> int:
    """The logits buffer: ``n_vocab`` floats for each of ``n_seq`` outputs (llama-context.cpp,
    output_reserve). It grows if a batch asks for more logit rows than that; the engine asks for
    one per sequence."""
    return _model(summary).n_vocab * 4 * max(1, options.n_seq)


# ---- compute buffers: the worst-case graph and ggml-alloc ------------------------------------

_F32, _F16, _I32, _I64 = 4, 2, 4, 8
_NONE, _VIEW = "NONE", "VIEW"
_INPUT, _OUTPUT = 1, 2
# ggml-alloc.c, ggml_op_can_inplace (UNARY covers silu, sigmoid ...)
_INPLACE = {"SCALE", "ADD", "ADD_ID", "ADD1", "SUB", "MUL", "DIV", "SQR", "SQRT", "LOG", "UNARY", "ROPE",
            "RMS_NORM", "CLAMP", "SOFT_MAX", "FILL"}
# ggml_backend_cuda_device_offload_op's batch size per op (get_op_batch_size): ops on host weights
# with at least this many rows run on the GPU, the weights copied in (ggml-backend.cpp, "1.off")
_OP_OFFLOAD_MIN_BATCH = 32


class _T:
    """A tensor of the rebuilt graph: only what ggml-alloc and the scheduler look at."""

    __slots__ = ("op", "shape", "size", "srcs", "view_src", "flags", "ext", "dev", "contig", "weight",
                 "children", "views", "alloc", "off", "reused")

    def __init__(self, op: str, shape: tuple[int, ...], elsize: int, srcs: tuple, view_src=None,
                 flags: int = 0, ext: bool = False, contig: bool = True, dev: str = CPU) -> None:
        self.op = op
        self.shape = (shape, elsize)  # ggml_are_same_layout: type and extents (our tensors are contiguous)
        self.size = math.prod(shape) * elsize
        self.srcs = srcs
        self.view_src = view_src
        self.flags = flags
        self.ext = ext  # weights and KV cache: in buffers of their own
        self.contig = contig
        self.dev: str | None = dev if ext else None  # where it is (or runs), once known
        self.weight = False


class _Graph:
    """Builds tensors the way ggml does and orders them the way ggml_build_forward_expand does.

    ``weights`` maps tensor names to (device, bytes) for the scheduler; without it every weight is
    on the CPU and only the order of the graph matters.
    """

    def __init__(self, weights: dict[str, tuple[str, int]] | None = None,
                 cache_devs: Sequence[str] | None = None) -> None:
        self.nodes: list[_T] = []
        self.leafs: list[_T] = []
        self._seen: set[int] = set()
        self._weights = weights
        self._w: dict[str, _T] = {}
        self._cache_devs = cache_devs
        self._caches: dict[str, _T] = {}

    def w(self, name: str) -> _T:
        """A weight (external tensor) by its GGUF name."""
        t = self._w.get(name)
        if t is None:
            dev, nbytes = (self._weights or {}).get(name, (CPU, 0))
            t = self._w[name] = _T(_NONE, (nbytes,), 1, (), ext=True, dev=dev)
            t.weight = True
        return t

    def cache(self, il: int) -> _T:
        """Layer ``il``'s KV cache tensor (external; on the layer's device: offload_kqv)."""
        dev = self._cache_devs[il] if self._cache_devs else CPU
        t = self._caches.get(dev)
        if t is None:
            t = self._caches[dev] = _T(_NONE, (1,), 1, (), ext=True, dev=dev)
        return t

    def input(self, shape: tuple[int, ...], elsize: int = _F32) -> _T:
        return _T(_NONE, shape, elsize, (), flags=_INPUT)

    def op(self, op: str, shape: tuple[int, ...], *srcs: _T | None, elsize: int = _F32) -> _T:
        return _T(op, shape, elsize, tuple(s for s in srcs if s is not None))

    def view(self, src: _T, shape: tuple[int, ...] | None = None, contig: bool = True, span: int = 0) -> _T:
        """A view (reshape, permute, slice): no memory of its own; ``contig`` for a plain reshape.
        ``span``: the bytes a strided view reaches over (ggml_nbytes of it), which is what a copy of
        it on another device takes."""
        base = src.view_src or src
        t = _T(_VIEW, shape or src.shape[0], src.shape[1], (src,), view_src=base, contig=contig and src.contig)
        t.ext = src.ext
        if span:
            t.size = span
        return t

    def set_rows(self, cache: _T, rows: _T, idxs: _T | None) -> _T:
        """ggml_set_rows into the KV cache: a view of the cache, reading ``rows``."""
        t = _T("SET_ROWS", (1,), 1, tuple(x for x in (rows, idxs, cache) if x is not None), view_src=cache)
        t.ext = True
        return t

    def expand(self, t: _T) -> None:
        """Post-order DFS over sources in order (ggml_visit_parents_graph), iteratively."""
        if id(t) in self._seen:
            return
        stack = [(t, 0)]
        while stack:
            node, i = stack.pop()
            if i == 0 and id(node) in self._seen:
                continue
            if i < len(node.srcs):
                stack.append((node, i + 1))
                src = node.srcs[i]
                if id(src) not in self._seen:
                    stack.append((src, 0))
                continue
            self._seen.add(id(node))
            if node.op == _NONE:
                self.leafs.append(node)
            else:
                self.nodes.append(node)


class _Allocator:
    """ggml-alloc's dynamic allocator (ggml_dyn_tallocr): best fit among the free blocks except the
    last, else the last block (which grows the buffer); freed blocks merge with their neighbours."""

    def __init__(self, alignment: int) -> None:
        self.align = alignment
        self.blocks = [[0, 1 << 62]]
        self.max = 0

    def alloc(self, size: int) -> int:
        size = _pad(size, self.align)
        best, best_size = -1, 0
        for i in range(len(self.blocks) - 1):
            bsz = self.blocks[i][1]
            if bsz >= size and (best < 0 or bsz <= best_size):
                best, best_size = i, bsz
        if best < 0:
            best = len(self.blocks) - 1
        block = self.blocks[best]
        off = block[0]
        block[0] += size
        block[1] -= size
        if block[1] == 0:
            del self.blocks[best]
        self.max = max(self.max, off + size)
        return off

    def free(self, off: int, size: int) -> None:
        size = _pad(size, self.align)
        blocks = self.blocks
        for i, b in enumerate(blocks):
            if b[0] + b[1] == off:
                b[1] += size
                if i + 1 < len(blocks) and b[0] + b[1] == blocks[i + 1][0]:
                    b[1] += blocks[i + 1][1]
                    del blocks[i + 1]
                return
            if off + size == b[0]:
                b[0] = off
                b[1] += size
                if i > 0 and blocks[i - 1][0] + blocks[i - 1][1] == b[0]:
                    blocks[i - 1][1] += b[1]
                    del blocks[i]
                return
        j = 0
        while j < len(blocks) and blocks[j][0] < off:
            j += 1
        blocks.insert(j, [off, size])


def _allocate(leafs: Sequence[_T], nodes: Sequence[_T], alignment: dict[str, int]) -> dict[str, int]:
    """Peak bytes per device of ggml_gallocr_alloc_graph_impl: leafs first, then nodes in order; a
    node takes over a parent's memory in place where ggml-alloc would (ggml-alloc.c)."""
    allocs: dict[str, _Allocator] = {}
    for t in (*leafs, *nodes):
        t.children = t.views = 0
        t.alloc = t.reused = False
        t.off = -1
        for p in t.srcs:
            p.children = p.views = 0
            p.alloc = p.reused = False

    def allocate(t: _T) -> None:
        if t.ext or t.view_src is not None or t.alloc or t.reused:
            return
        t.alloc = True
        if t.op in _INPLACE:
            for p in t.srcs:
                if (p.alloc and p.view_src is None and not p.flags & _OUTPUT and p.shape == t.shape
                        and p.children == 1 and p.views == 0 and p.dev == t.dev):
                    t.off = p.off
                    p.alloc, p.reused = False, True
                    return
        dev = t.dev or CPU
        a = allocs.get(dev)
        if a is None:
            a = allocs[dev] = _Allocator(alignment.get(dev, alignment.get("gpu", 32)))
        t.off = a.alloc(t.size)

    def free(t: _T) -> None:
        if t.flags & _OUTPUT or not t.alloc:
            return
        allocs[t.dev or CPU].free(t.off, t.size)
        t.alloc = False

    for t in leafs:
        allocate(t)
    for t in nodes:
        if t.view_src is not None and t.op != _NONE:
            t.view_src.views += 1
        if t.flags & _INPUT:
            allocate(t)
        for p in t.srcs:
            p.children += 1
            if p.flags & _INPUT:
                allocate(p)
    for t in nodes:
        for p in t.srcs:
            allocate(p)
        allocate(t)
        for p in t.srcs:
            p.children -= 1
            if p.children == 0 and p.views == 0:
                if p.view_src is not None:
                    base = p.view_src
                    base.views -= 1
                    if base.views == 0 and base.children == 0:
                        free(base)
                else:
                    free(p)
    return {dev: a.max for dev, a in allocs.items()}


@dataclass(frozen=True)
class _GraphKey:
    n_tokens: int
    n_outputs: int
    n_stream: int
    n_kv: int
    n_kv_swa: int
    flash_attn: bool
    kv_type: str


def _build_graph(m: _Model, k: _GraphKey, weights: dict[str, tuple[str, int]] | None = None,
                 cache_devs: Sequence[str] | None = None, layers: Sequence[int] | None = None) -> _Graph:
    """The worst-case graph llama.cpp reserves (one ubatch against the full cache), tensor for
    tensor where it allocates, in its node order (models/*.cpp, llama-graph.cpp).

    ``layers``: the layers to build (all by default); see :func:`_kept_layers`."""
    g = _Graph(weights, cache_devs)
    T, E, fa = k.n_tokens, m.n_embd, k.flash_attn
    cache_el = {"f32": _F32, "f16": _F16, "bf16": _F16}.get(k.kv_type, _F16)
    quant = k.kv_type in _QUANTIZED_KV and not m.mla
    tokens = g.input((T,), _I32)
    inp_embd = g.input((E, T))
    pos = g.input((T * m.n_pos,), _I32)
    caches: dict[str, dict] = {}
    kinds = ("swa", "base") if m.layers and m.layers[0].swa else ("base", "swa")
    for kind in kinds:
        if kind == "swa" and not m.sliding_window:
            continue
        v_rows = 0 if m.mla else (1 if fa else max((ly.n_head_kv for ly in m.layers), default=0) * m.head_v)
        rot = _rot_size(m.head_k)
        caches[kind] = {
            "n_kv": k.n_kv_swa if kind == "swa" else k.n_kv,
            "k_idxs": g.input((T,), _I64),
            "v_idxs": g.input((T * v_rows,), _I64) if v_rows else None,
            "mask": g.input((k.n_kv_swa if kind == "swa" else k.n_kv, T), _F16 if fa else _F32),
            # llama-kv-cache.cpp: Hadamard rotations of Q/K (and V) for quantized caches
            "k_rot": g.input((rot, rot)) if quant and m.head_k % 64 == 0 else None,
            "v_rot": g.input((64, 64)) if quant and m.head_v % 64 == 0 else None,
        }
    out_ids = g.input((k.n_outputs,), _I32)
    attn_scale = g.input((1, 1, T)) if m.no_rope_step else None  # build_inp_attn_scale
    # the recurrent state's inputs (build_inp_rs): which cached state each sequence of the ubatch reads
    rs_copy = g.input((max(1, k.n_stream),), _I32) if any(ly.recurrent for ly in m.layers) else None

    def norm(x: _T, weight: str) -> _T:
        return g.op("MUL", x.shape[0], g.op("RMS_NORM", x.shape[0], x), g.w(weight))

    embd = g.op("GET_ROWS", (E, T), g.w("token_embd.weight"), tokens)
    g.expand(embd)
    g.expand(inp_embd)
    inp = embd
    for il in (range(m.n_layer) if layers is None else layers):
        ly = m.layers[il]
        b = f"blk.{il}."
        inp_sa = inp
        cur = norm(inp, b + "attn_norm.weight")
        if ly.recurrent and m.arch in _DELTA_NET_ARCHS:
            attn = _delta_net(g, m, k, il, cur, rs_copy)
        elif ly.recurrent or ly.n_head_kv == 0:
            attn = cur  # other recurrent mixers (Mamba, RWKV ...) are not modelled
        elif m.mla:
            attn = _mla_attention(g, m, k, ly, il, cur, pos, caches["base"], cache_el)
        else:
            cache = caches["swa" if ly.swa and "swa" in caches else "base"]
            attn = _attention(g, m, k, ly, il, cur, pos, cache, cache_el, iswa=bool(m.sliding_window),
                              attn_scale=attn_scale)
        if il == m.n_layer - 1 and not m.out_rows_late:
            attn = g.op("GET_ROWS", (E, k.n_outputs), attn, out_ids)
            inp_sa = g.op("GET_ROWS", (E, k.n_outputs), inp_sa, out_ids)
        rows = attn.shape[0][1]
        ffn_inp = g.op("ADD", (E, rows), attn, inp_sa)
        cur = norm(ffn_inp, b + ("post_attention_norm.weight" if m.arch in _POST_ATTN_NORM else "ffn_norm.weight"))
        if ly.ffn == "moe":
            cur = _moe(g, m, ly, il, cur)
        elif ly.ffn == "dense":
            cur = _ffn(g, cur, ly.n_ff, b, "")
        l_out = g.op("ADD", (E, rows), cur, ffn_inp)
        if il == m.n_layer - 1 and m.out_rows_late and not m.out_rows_after_norm:
            l_out.flags |= _OUTPUT  # gpt-oss hands the last hidden state out (t_h_nextn)
        g.expand(l_out)
        inp = l_out
    if m.out_rows_late and not m.out_rows_after_norm:
        inp = g.op("GET_ROWS", (E, k.n_outputs), inp, out_ids)
    result_norm = norm(inp, "output_norm.weight")
    result_norm.flags |= _OUTPUT  # Qwen3.5: the normed hidden state of every token (t_h_nextn)
    if m.out_rows_after_norm:
        result_norm = g.op("GET_ROWS", (E, k.n_outputs), result_norm, out_ids)
        result_norm.flags |= _OUTPUT
    logits = g.op("MUL_MAT", (m.n_vocab, result_norm.shape[0][1]), g.w("output.weight"), result_norm)
    logits.flags |= _OUTPUT
    g.expand(logits)
    return g


# Layers built per run of identical layers: ggml-alloc's layout repeats from the second layer of a
# run on, so more change nothing (checked against llama.cpp on every test architecture). Longer
# repeating units (hybrids' delta-net layers plus an attention layer) keep _RUN_UNITS units: on a
# Qwen3.5-35B-A3B shape one unit already gives the same bytes as all 40 layers (6 placements x 3
# option sets), and building 12 layers instead of 24 halves fit's time.
_RUN = 6
_RUN_UNITS = 3


def _kept_layers(m: _Model, weights: dict[str, tuple[str, int]] | None = None,
                 layer_dev: Sequence[str] | None = None) -> tuple[int, ...]:
    """The layers worth building: at most _RUN of every run of identical layers (same structure,
    same devices for them and their weights; alternating sliding-window layers count in pairs,
    hybrids' delta-net-and-attention units as one, see _period), and always the last layer, which
    selects the output rows."""
    per_layer: dict[int, list[tuple[str, str]]] = {}
    for name, (dev, _) in (weights or {}).items():
        if name.startswith("blk."):
            il_s, _, rest = name[4:].partition(".")
            per_layer.setdefault(int(il_s), []).append((rest, dev))
    sig = [(m.layers[il], layer_dev[il] if layer_dev else CPU, tuple(sorted(per_layer.get(il, ()))))
           for il in range(m.n_layer)]
    period = _period(m)
    limit = (_RUN if period <= 2 else _RUN_UNITS) * period
    kept: list[int] = []
    run = 0
    for il in range(m.n_layer):
        same = il >= period and sig[il - period] == sig[il] and il != m.n_layer - 1
        run = run + 1 if same else 0
        if run < limit:
            kept.append(il)
    return tuple(kept)


def _delta_net(g: _Graph, m: _Model, k: _GraphKey, il: int, cur: _T, rs_copy: _T | None) -> _T:
    """build_layer_attn_linear (models/qwen35moe.cpp, qwen3next.cpp) with llama.cpp's fused
    gated-delta-net op, which it uses on every backend that has it: projections, the causal conv
    over the cached conv state, L2-normed q/k, one GATED_DELTA_NET node (outputs and the new
    state), gated norm, output projection. The state updates are copies into the recurrent cache:
    no memory here."""
    g.expand(cur)  # the layer's input norm is expanded first (models/qwen35moe.cpp)
    T, E = k.n_tokens, m.n_embd
    ns = max(1, k.n_stream)
    tn = T // ns
    b = f"blk.{il}."
    w = g.w
    hv, s_k, hk = m.n_v_heads, m.d_state, m.n_group
    s_v = m.d_inner // hv if hv else 0
    conv_ch = m.d_inner + 2 * hk * s_k
    n_r = max(m.d_conv - 1, 0) * conv_ch
    if m.ssm_in:  # Qwen3-Next: one projection, split per key head, copied apart, joined again
        per_head = 2 * s_k + 2 * m.d_inner // hk
        mixed = g.op("MUL_MAT", (per_head * hk, T), w(b + "ssm_in.weight"), cur)
        z = g.op("CONT", (m.d_inner // hk, hk, tn, ns), g.view(mixed, (m.d_inner // hk, hk, tn, ns), False))
        q_flat = g.op("CONT", (s_k * hk, tn, ns), g.view(mixed, (s_k, hk, tn, ns), False))
        k_flat = g.op("CONT", (s_k * hk, tn, ns), g.view(mixed, (s_k, hk, tn, ns), False))
        v_flat = g.op("CONT", (m.d_inner, tn, ns), g.view(mixed, (m.d_inner // hk, hk, tn, ns), False))
        qkv = g.op("CONCAT", (conv_ch, tn, ns), g.op("CONCAT", (2 * s_k * hk, tn, ns), q_flat, k_flat), v_flat)
        ba = g.op("MUL_MAT", (2 * hv, T), w(b + "ssm_ba.weight"), cur)
        beta = g.op("CONT", (hv // hk, hk, tn, ns), g.view(ba, (hv // hk, hk, tn, ns), False))
        beta = g.view(g.op("UNARY", beta.shape[0], beta), (1, hv, tn, ns))
        alpha = g.op("CONT", (hv, tn, ns), g.view(ba, (hv // hk, hk, tn, ns), False))
    else:  # Qwen3.5
        qkv = g.view(g.op("MUL_MAT", (conv_ch, T), w(b + "attn_qkv.weight"), cur), (conv_ch, tn, ns))
        z = g.op("MUL_MAT", (m.d_inner, T), w(b + "attn_gate.weight"), cur)
        beta = g.op("UNARY", (1, hv, tn, ns), g.view(g.op("MUL_MAT", (hv, T), w(b + "ssm_beta.weight"), cur),
                                                     (1, hv, tn, ns)))
        alpha = g.view(g.op("MUL_MAT", (hv, T), w(b + "ssm_alpha.weight"), cur), (hv, tn, ns))
    alpha = g.op("UNARY", (hv, tn, ns), g.op("ADD", (hv, tn, ns), alpha, w(b + "ssm_dt.bias")))
    gate = g.view(g.op("MUL", (hv, tn, ns), alpha, w(b + "ssm_a")), (1, hv, tn, ns))
    cache = g.cache(il)
    conv_states = g.op("GET_ROWS", (n_r, ns), g.view(cache, (n_r, ns)), rs_copy)
    g.expand(conv_states)
    conv_in = g.op("CONCAT", (m.d_conv - 1 + tn, conv_ch, ns), g.view(conv_states, (m.d_conv - 1, conv_ch, ns)),
                   g.view(qkv, (tn, conv_ch, ns), contig=False))
    g.expand(g.set_rows(cache, g.view(conv_in, (m.d_conv - 1, conv_ch, ns), contig=False), None))
    state = g.op("GET_ROWS", (s_v * s_v * hv, ns), g.view(cache, (s_v * s_v * hv, ns)), rs_copy)
    g.expand(state)
    conv = g.op("UNARY", (conv_ch, tn, ns), g.op("SSM_CONV", (conv_ch, tn, ns), conv_in, w(b + "ssm_conv1d.weight")))
    q = g.view(conv, (s_k, hk, tn, ns), contig=False)
    kk = g.view(conv, (s_k, hk, tn, ns), contig=False)
    v = g.view(conv, (s_v, hv, tn, ns), contig=False)
    q = g.op("SCALE", (s_k, hk, tn, ns), g.op("RMS_NORM", (s_k, hk, tn, ns), q))
    kk = g.op("SCALE", (s_k, hk, tn, ns), g.op("RMS_NORM", (s_k, hk, tn, ns), kk))
    if m.arch == "qwen3next" and hk != hv:  # Qwen3-Next repeats the key heads up to the value heads
        q = g.view(g.op("REPEAT", (s_k, hv // hk, hk, T), g.view(q, (s_k, 1, hk, T))), (s_k, hv, tn, ns))
        kk = g.view(g.op("REPEAT", (s_k, hv // hk, hk, T), g.view(kk, (s_k, 1, hk, T))), (s_k, hv, tn, ns))
    out = g.op("GATED_DELTA_NET", (s_v * hv * tn * ns + s_v * s_v * hv * ns,), q, kk, v, gate, beta,
               g.view(state, (s_v, s_v, hv, ns)))
    g.expand(g.set_rows(cache, g.view(out, (s_v, s_v, hv, ns), contig=False), None))
    o = g.view(out, (s_v, hv, tn, ns), contig=False)
    normed = g.op("MUL", (s_v, hv, tn, ns), g.op("RMS_NORM", (s_v, hv, tn, ns), o), w(b + "ssm_norm.weight"))
    gated = g.op("MUL", (s_v, hv, tn, ns), normed, g.op("UNARY", (s_v, hv, tn, ns), g.view(z, (s_v, hv, tn, ns))))
    return g.view(g.op("MUL_MAT", (E, tn, ns), w(b + "ssm_out.weight"), g.view(gated, (m.d_inner, tn, ns))), (E, T))


def _period(m: _Model) -> int:
    """How many layers make one repeating unit: 1; 2 where sliding-window layers alternate; the
    attention interval of hybrids (Qwen3.5: three delta-net layers, then one attention layer)."""
    attn = [il for il, ly in enumerate(m.layers) if not ly.recurrent]
    if len(attn) < len(m.layers):
        gaps = {b - a for a, b in zip(attn, attn[1:], strict=False)}
        if len(gaps) == 1:
            return gaps.pop()
    return 2 if m.sliding_window else 1


def _rot_size(head: int) -> int:
    """The Hadamard matrix size llama.cpp picks for K (build_input_k_rot): the largest power of two
    from 64 up that divides the head size."""
    n = 64
    while head % (n * 2) == 0:
        n *= 2
    return n


def _hadamard(g: _Graph, x: _T, rot: _T) -> _T:
    """llama_mul_mat_hadamard: reshape (or copy) to rows of n, multiply by the rotation, reshape."""
    n = rot.shape[0][0]
    total = math.prod(x.shape[0])
    src = g.view(x, (n, total // n)) if x.contig else g.op("CONT", (n, total // n), x)
    return g.view(g.op("MUL_MAT", (n, total // n), rot, src), x.shape[0])


def _attention(g: _Graph, m: _Model, k: _GraphKey, ly: _Layer, il: int, cur: _T, pos: _T, cache: dict,
               cache_el: int, iswa: bool, attn_scale: _T | None = None) -> _T:
    """build_qkv + rope + build_attn (llama-graph.cpp) for a GQA layer with a K/V cache."""
    T, ns, fa = k.n_tokens, k.n_stream, k.flash_attn
    hk, hv, nh, nkv = m.head_k, m.head_v, ly.n_head, ly.n_head_kv
    n_kv = cache["n_kv"]
    b = f"blk.{il}."
    w = g.w
    if ly.fused_qkv:
        qkv = g.op("MUL_MAT", (nh * hk + nkv * (hk + hv), T), w(b + "attn_qkv.weight"), cur)
        q, kk, v = (g.view(qkv, (hk, nh, T), False), g.view(qkv, (hk, nkv, T), False),
                    g.view(qkv, (hv, nkv, T), False))
    elif m.arch in _DELTA_NET_ARCHS:  # Qwen3.5: queries and an output gate from one projection
        q_full = g.op("MUL_MAT", (2 * nh * hk, T), w(b + "attn_q.weight"), cur)
        kk = g.op("MUL_MAT", (nkv * hk, T), w(b + "attn_k.weight"), cur)
        v = g.op("MUL_MAT", (nkv * hv, T), w(b + "attn_v.weight"), cur)
        q, kk, v = g.view(q_full, (hk, nh, T), False), g.view(kk, (hk, nkv, T)), g.view(v, (hv, nkv, T))
    else:
        q = g.op("MUL_MAT", (nh * hk, T), w(b + "attn_q.weight"), cur)
        q = g.op("ADD", q.shape[0], q, w(b + "attn_q.bias")) if ly.q_bias else q
        kk = g.op("MUL_MAT", (nkv * hk, T), w(b + "attn_k.weight"), cur)
        kk = g.op("ADD", kk.shape[0], kk, w(b + "attn_k.bias")) if ly.k_bias else kk
        v = g.op("MUL_MAT", (nkv * hv, T), w(b + "attn_v.weight"), cur)
        v = g.op("ADD", v.shape[0], v, w(b + "attn_v.bias")) if ly.v_bias else v
        q, kk, v = g.view(q, (hk, nh, T)), g.view(kk, (hk, nkv, T)), g.view(v, (hv, nkv, T))
    if m.no_rope_step and (il + 1) % m.no_rope_step == 0:  # Llama 4's NoPE layers: queries scaled
        q = g.op("MUL", q.shape[0], q, attn_scale)
    elif m.no_rope_step:
        q, kk = g.op("ROPE", q.shape[0], q, pos), g.op("ROPE", kk.shape[0], kk, pos)
        if m.kq_norm:
            q, kk = g.op("RMS_NORM", q.shape[0], q), g.op("RMS_NORM", kk.shape[0], kk)
    else:
        if ly.qk_norm:
            q = g.op("MUL", q.shape[0], g.op("RMS_NORM", q.shape[0], q), w(b + "attn_q_norm.weight"))
        q = g.op("ROPE", q.shape[0], q, pos)
        if ly.qk_norm:
            kk = g.op("MUL", kk.shape[0], g.op("RMS_NORM", kk.shape[0], kk), w(b + "attn_k_norm.weight"))
        kk = g.op("ROPE", kk.shape[0], kk, pos)
    if cache["k_rot"] is not None:
        q, kk = _hadamard(g, q, cache["k_rot"]), _hadamard(g, kk, cache["k_rot"])
    if cache["v_rot"] is not None:
        v = _hadamard(g, v, cache["v_rot"])
    for t in ((q, kk, v) if iswa else (q, v, kk)):
        g.expand(t)
    # cpy_k / cpy_v: rows written into the cache (views of it: only copies of V can allocate)
    kv_cache = g.cache(il)
    g.expand(g.set_rows(kv_cache, g.view(kk, (nkv * hk, T)), cache["k_idxs"]))
    if not fa:  # V is stored transposed: one row per element
        v_rows = g.view(v, (nkv * hv, T)) if v.contig else g.op("CONT", (nkv * hv, T), v)
        v_rows = g.view(v_rows, (1, nkv * hv * T))
    else:
        v_rows = g.view(v, (nkv * hv, T))
    g.expand(g.set_rows(kv_cache, v_rows, cache["v_idxs"]))
    kc = g.view(kv_cache)
    vc = g.view(kv_cache)
    qv = g.view(g.view(q, (hk, nh, T // ns, ns)), (hk, T // ns, nh, ns), False)
    sinks = w(b + "attn_sinks.weight") if m.arch == "gpt-oss" else None
    if fa:
        if cache_el == _F32:  # flash attention wants F16 K and V
            kc = g.op("CPY", (hk, n_kv, nkv, ns), kc, elsize=_F16)
            vc = g.op("CPY", (hv, n_kv, nkv, ns), vc, elsize=_F16)
        out = g.op("FLASH_ATTN_EXT", (hv, nh, T // ns, ns), qv, kc, vc, cache["mask"], sinks)
        out = g.view(out, (hv * nh, T))
    else:
        kq = g.op("MUL_MAT", (n_kv, T // ns, nh, ns), kc, qv)
        kq = g.op("SOFT_MAX", kq.shape[0], kq, cache["mask"], sinks)
        kqv = g.op("MUL_MAT", (hv, T // ns, nh, ns), vc, kq)
        out = g.op("CONT", (hv * nh, T), g.view(kqv, (hv, nh, T // ns, ns), False))
    g.expand(out)
    if cache["v_rot"] is not None:
        out = _hadamard(g, out, cache["v_rot"])
    if m.arch in _DELTA_NET_ARCHS:
        gate = g.op("CONT", (hk * nh, T), g.view(q_full, (hk, nh, T), False))
        out = g.op("MUL", out.shape[0], out, g.op("UNARY", gate.shape[0], gate))
    out = g.op("MUL_MAT", (m.n_embd, T), w(b + "attn_output.weight"), out)
    return g.op("ADD", out.shape[0], out, w(b + "attn_output.bias")) if ly.o_bias else out


def _mla_attention(g: _Graph, m: _Model, k: _GraphKey, ly: _Layer, il: int, cur: _T, pos: _T, cache: dict,
                   cache_el: int) -> _T:
    """DeepSeek's multi-head latent attention with the absorption trick (models/deepseek2.cpp): the
    cache holds the compressed latent plus the rope part; V is read out of K."""
    T, ns, fa = k.n_tokens, k.n_stream, k.flash_attn
    nh, rope, lora = ly.n_head, m.rope_dim, m.kv_lora
    qk = m.head_k_mla
    nope = qk - rope
    n_kv = cache["n_kv"]
    b = f"blk.{il}."
    w = g.w
    if m.q_lora:
        q = g.op("MUL_MAT", (m.q_lora, T), w(b + "attn_q_a.weight"), cur)
        q = g.op("MUL", q.shape[0], g.op("RMS_NORM", q.shape[0], q), w(b + "attn_q_a_norm.weight"))
        q = g.op("MUL_MAT", (nh * qk, T), w(b + "attn_q_b.weight"), q)
    else:
        q = g.op("MUL_MAT", (nh * qk, T), w(b + "attn_q.weight"), cur)
    q = g.view(q, (qk, nh, T))
    kv_pe = g.op("MUL_MAT", (lora + rope, T), w(b + "attn_kv_a_mqa.weight"), cur)
    kv_cmpr = g.view(kv_pe, (lora, T), False)
    k_pe = g.op("ROPE", (rope, 1, T), g.view(kv_pe, (rope, 1, T), False), pos)
    kv_cmpr = g.op("MUL", (lora, T), g.op("RMS_NORM", (lora, T), kv_cmpr), w(b + "attn_kv_a_norm.weight"))
    q_nope = g.view(g.view(q, (nope, nh, T), False), (nope, T, nh), False)
    q_pe = g.op("ROPE", (rope, nh, T), g.view(q, (rope, nh, T), False), pos)
    q_abs = g.view(g.op("MUL_MAT", (lora, T, nh), w(b + "attn_k_b.weight"), q_nope), (lora, nh, T), False)
    qcur = g.op("CONCAT", (lora + rope, nh, T), q_abs, q_pe)
    vcur = g.view(kv_cmpr, (lora, 1, T))
    kcur = g.op("CONCAT", (lora + rope, 1, T), vcur, k_pe)
    for t in (qcur, vcur, kcur):
        g.expand(t)
    kv_cache = g.cache(il)
    g.expand(g.set_rows(kv_cache, g.view(kcur, (lora + rope, T)), cache["k_idxs"]))
    qv = g.view(g.view(qcur, (lora + rope, nh, T // ns, ns)), (lora + rope, T // ns, nh, ns), False)
    kc = g.view(kv_cache)
    vc = g.view(kv_cache)
    v_mla = w(b + "attn_v_b.weight")
    if fa:
        if cache_el == _F32:
            kc = g.op("CPY", (lora + rope, n_kv, 1, ns), kc, elsize=_F16)
            vc = g.op("CPY", (lora, n_kv, 1, ns), vc, elsize=_F16)
        out = g.op("FLASH_ATTN_EXT", (lora, nh, T // ns, ns), qv, kc, vc, cache["mask"])
        out = g.op("MUL_MAT", (m.head_v_mla, T // ns, nh, ns), v_mla, g.view(out, (lora, T // ns, nh, ns), False))
        out = g.op("CONT", (m.head_v_mla, nh, T // ns, ns), g.view(out, None, False))
        out = g.view(out, (m.head_v_mla * nh, T))
    else:
        kq = g.op("MUL_MAT", (n_kv, T // ns, nh, ns), kc, qv)
        kq = g.op("SOFT_MAX", kq.shape[0], kq, cache["mask"])
        v_cont = g.op("CONT", (n_kv, lora, 1, ns), vc, elsize=cache_el)
        kqv = g.op("MUL_MAT", (lora, T // ns, nh, ns), v_cont, kq)
        kqv = g.op("MUL_MAT", (m.head_v_mla, T // ns, nh, ns), v_mla, kqv)
        out = g.op("CONT", (m.head_v_mla * nh, T), g.view(kqv, (m.head_v_mla, nh, T // ns, ns), False))
    g.expand(out)
    return g.op("MUL_MAT", (m.n_embd, T), w(b + "attn_output.weight"), out)


def _ffn(g: _Graph, cur: _T, n_ff: int, b: str, suffix: str) -> _T:
    """build_ffn with a parallel SiLU gate (swiglu): up, gate, their product, down."""
    rows = cur.shape[0][1]
    up = g.op("MUL_MAT", (n_ff, rows), g.w(f"{b}ffn_up{suffix}.weight"), cur)
    gate = g.op("MUL_MAT", (n_ff, rows), g.w(f"{b}ffn_gate{suffix}.weight"), cur)
    act = g.op("GLU", (n_ff, rows), gate, up)
    return g.op("MUL_MAT", (cur.shape[0][0], rows), g.w(f"{b}ffn_down{suffix}.weight"), act)


def _moe(g: _Graph, m: _Model, ly: _Layer, il: int, cur: _T) -> _T:
    """build_moe_ffn (router, top-k, expert weights, the three expert matmuls, the weighted sum)
    plus a shared expert where the layer has one."""
    E, rows = cur.shape[0]
    n_exp, n_used, ff = m.n_expert, m.n_expert_used, ly.n_ff
    b = f"blk.{il}."
    w = g.w
    logits = g.op("MUL_MAT", (n_exp, rows), w(b + "ffn_gate_inp.weight"), cur)
    if ly.router_bias:
        logits = g.op("ADD", logits.shape[0], logits, w(b + "ffn_gate_inp.bias"))
    if m.gating == "softmax":
        probs = g.op("SOFT_MAX", logits.shape[0], logits)
    elif m.gating == "sigmoid":
        probs = g.op("UNARY", logits.shape[0], logits)
    else:
        probs = logits
    select = g.op("ADD", probs.shape[0], probs, w(b + "exp_probs_b.bias")) if ly.probs_bias else probs
    probs_r = g.view(probs, (1, n_exp, rows))
    topk = g.view(g.op("ARGSORT", (n_exp, rows), select, elsize=_I32), (n_used, rows), False,
                  span=((rows - 1) * n_exp + n_used) * _I32)
    weights = g.op("GET_ROWS", (1, n_used, rows), probs_r, topk)
    if m.gating == "softmax_weight":
        weights = g.view(g.op("SOFT_MAX", (n_used, rows), g.view(weights, (n_used, rows))), (1, n_used, rows))
    if m.norm_w:
        w2 = g.view(weights, (n_used, rows))
        total = g.op("CLAMP", (1, rows), g.op("SUM_ROWS", (1, rows), w2))
        weights = g.view(g.op("DIV", (n_used, rows), w2, total), (1, n_used, rows))
    if m.w_scale not in (0.0, 1.0):
        weights = g.op("SCALE", (1, n_used, rows), weights)
    g.expand(weights)
    x = g.view(cur, (E, 1, rows))
    before = m.arch == "llama4"  # Llama 4 weights each expert's input, not its output
    if before:
        x = g.op("MUL", (E, n_used, rows), g.op("REPEAT", (E, n_used, rows), x), weights)
    if ly.fused_gate_up:
        both = g.op("MUL_MAT_ID", (2 * ff, n_used, rows), w(b + "ffn_gate_up_exps.weight"), x, topk)
        up, gate = g.view(both, (ff, n_used, rows), False), g.view(both, (ff, n_used, rows), False)
    else:
        up = g.op("MUL_MAT_ID", (ff, n_used, rows), w(b + "ffn_up_exps.weight"), x, topk)
        if ly.expert_bias:
            up = g.op("ADD_ID", up.shape[0], up, w(b + "ffn_up_exps.bias"), topk)
        gate = g.op("MUL_MAT_ID", (ff, n_used, rows), w(b + "ffn_gate_exps.weight"), x, topk)
        if ly.expert_bias:
            gate = g.op("ADD_ID", gate.shape[0], gate, w(b + "ffn_gate_exps.bias"), topk)
    act = g.op("GLU", (ff, n_used, rows), gate, up)
    experts = g.op("MUL_MAT_ID", (E, n_used, rows), w(b + "ffn_down_exps.weight"), act, topk)
    if ly.expert_bias:
        experts = g.op("ADD_ID", experts.shape[0], experts, w(b + "ffn_down_exps.bias"), topk)
    if not before:
        experts = g.op("MUL", experts.shape[0], experts, weights)
    g.expand(experts)
    views = [g.view(experts, (E, rows), False, span=((rows - 1) * n_used * E + E) * _F32) for _ in range(n_used)]
    for v in views:
        g.expand(v)
    out = views[0]
    for v in views[1:]:
        out = g.op("ADD", (E, rows), out, v)
        g.expand(out)
    if n_used == 1:
        out = g.op("CONT", (E, rows), out)
    if ly.n_ff_shexp:
        shared = _ffn(g, cur, ly.n_ff_shexp, b, "_shexp")
        if ly.shexp_gate:
            gi = g.op("MUL_MAT", (1, rows), w(b + "ffn_gate_inp_shexp.weight"), cur)
            if m.arch in _DELTA_NET_ARCHS:  # a plain sigmoid
                gate_s = g.op("UNARY", (1, rows), gi)
            else:  # qwen2moe: silu(x) / x
                gate_s = g.op("DIV", (1, rows), g.op("UNARY", (1, rows), gi), gi)
            shared = g.op("MUL", shared.shape[0], shared, gate_s)
        out = g.op("ADD", (E, rows), out, shared)
    return out


def graph_key(summary: ModelSummary, options: RunOptions) -> _GraphKey:
    s = context_sizes(options, summary.context_length)
    return _GraphKey(
        n_tokens=s.n_tokens, n_outputs=s.n_outputs, n_stream=s.n_stream, n_kv=s.n_ctx_seq,
        n_kv_swa=swa_cells(summary, options), flash_attn=options.flash_attn, kv_type=options.kv_type,
    )


@lru_cache(maxsize=256)
def _compute_cpu(m: _Model, k: _GraphKey) -> int:
    g = _build_graph(m, k, layers=_kept_layers(m))
    for t in g.nodes:
        t.dev = CPU
    for t in g.leafs:
        t.dev = t.dev or CPU
    return _allocate(g.leafs, g.nodes, {CPU: _ALIGN["cpu"]}).get(CPU, 0)


def compute_is_exact(summary: ModelSummary) -> bool:
    """Whether :func:`compute_bytes` rebuilds this architecture's graph node for node."""
    return _model(summary).exact


def compute_bytes(summary: ModelSummary, options: RunOptions) -> int:
    """llama.cpp's CPU compute buffer when the whole model runs on the CPU.

    Exact (to the byte, against ``llama_get_memory_breakdown``) for the architectures llama.cpp
    builds as llama (dense and Mixtral-style), qwen2moe, qwen3moe, deepseek2 (MLA, with or without
    q_lora), gpt-oss, glm4moe, qwen35moe and qwen3next (gated delta nets through llama.cpp's fused
    op), at any context, ubatch, sequence count, KV type and flash-attention setting. Other
    architectures are built from the same blocks (GQA or MLA attention with optional biases and
    Q/K norms, dense or MoE FFN with shared experts): right where they are made of those blocks,
    off by what they add where they are not (extra norms, gates, vision inputs, fused ops); other
    recurrent mixers (Mamba, RWKV, Kimi's delta nets) are not modelled and count for nothing, which
    underestimates those hybrids where their layers set the peak.
    """
    return _compute_cpu(_model(summary), graph_key(summary, options))


# ---- llama.cpp's scheduler: compute buffers with GPUs ----------------------------------------

_VIEW_OPS = {_VIEW, "RESHAPE", "PERMUTE", "TRANSPOSE"}
_NO_OP_OFFLOAD = {"metal", "rpc", "cpu", "blas"}


def _schedule(g: _Graph, backends: Sequence[str], op_offload: bool) -> tuple[list[_T], list[_T]]:
    """ggml_backend_sched_split_graph on the rebuilt graph: assign every node a device, then cut the
    graph into splits and put, at the start of each split, a copy of every tensor it reads from
    another device (one copy per tensor and device). Returns (leafs, nodes) as ggml-alloc sees them.

    Devices: ``backends`` in priority order, the CPU last (llama-context.cpp builds them so).
    """
    cpu = backends[-1]
    gpus = backends[:-1]
    for t in g.leafs:
        if t.flags & _INPUT:
            t.dev = cpu  # graph inputs: "1.inp"
    nodes = g.nodes
    # pass 1: pre-allocated tensors and ops on weights run where the data is
    for t in nodes:
        t.dev = None
        if t.view_src is not None and t.view_src.ext:
            t.dev = t.view_src.dev
            continue
        if t.op in ("ROPE", "FLASH_ATTN_EXT"):
            continue
        for p in t.srcs:
            if p.weight:
                t.dev = p.dev
                if op_offload and p.dev == cpu and gpus and _offload_batch(t) >= _OP_OFFLOAD_MIN_BATCH:
                    t.dev = gpus[0]  # "1.off": a GPU computes it, the weight copied in
                break
    # passes 2-3: spread GPU devices down and up the graph (not across CPU nodes), then any device
    for skip_cpu in (True, False):
        for order in (nodes, list(reversed(nodes))):
            cur = None
            for t in order:
                if t.op in _VIEW_OPS:
                    continue
                if t.dev is not None:
                    cur = None if skip_cpu and t.dev == cpu else t.dev
                elif cur is not None:
                    t.dev = cur
    # pass 4 leaves nothing unassigned here (every op runs everywhere); pass 5: views and sources
    for t in nodes:
        if t.dev is None:
            t.dev = t.view_src.dev if t.view_src is not None and t.view_src.dev else cpu
        for p in t.srcs:
            if p.dev is None:
                p.dev = p.view_src.dev if p.view_src is not None and p.view_src.dev else t.dev
    # splits and their input copies
    out: list[_T] = []
    copies: dict[tuple[int, str], _T] = {}
    split_inputs: list[_T] = []
    split_nodes: list[_T] = []
    split_dev = next((t.dev for t in nodes if t.op not in _VIEW_OPS), cpu)

    def flush() -> None:
        for c in split_inputs:
            out.append(c)
        out.extend(split_nodes)
        split_inputs.clear()
        split_nodes.clear()

    for t in nodes:
        if t.op in _VIEW_OPS:
            split_nodes.append(t)
            continue
        new_split = t.dev != split_dev
        if not new_split and split_inputs:
            new_split = any(p.weight and p.dev != split_dev for p in t.srcs)
        if new_split:
            flush()
            split_dev = t.dev
        srcs = []
        for p in t.srcs:
            if p.dev != split_dev and not (split_dev == cpu and p.dev == cpu):
                key = (id(p), split_dev)
                c = copies.get(key)
                if c is None:
                    # the copy (a tensor of its own on this device) and, before it, a view that keeps
                    # the source alive until the copy is made (ggml_backend_sched_split_graph)
                    c = _T(_NONE, p.shape[0], p.shape[1], ())
                    c.size = p.size  # ggml_dup_tensor_layout keeps a view's strides
                    c.dev = split_dev
                    dep = _T(_NONE, p.shape[0], p.shape[1], (p,), view_src=p.view_src or p)  # ggml_view_tensor
                    dep.ext = p.ext
                    dep.dev = p.dev
                    copies[key] = c
                    split_inputs += [dep, c]
                p = c
            srcs.append(p)
        t.srcs = tuple(srcs)
        split_nodes.append(t)
    flush()
    return g.leafs, out


def _offload_batch(t: _T) -> int:
    """get_op_batch_size of ggml-cuda.cu: tokens for matmuls and rope, rows for the rest."""
    shape = t.shape[0]
    if t.op == "GET_ROWS":
        return 0
    if t.op == "MUL_MAT":
        return shape[1] if len(shape) > 1 else 1
    if t.op in ("MUL_MAT_ID", "ROPE"):
        return shape[2] if len(shape) > 2 else 1
    return math.prod(shape[1:]) if len(shape) > 1 else 1


# ---- per device ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reference:
    """llama.cpp's own figures for the whole model on the CPU at one set of options (its no_alloc
    dry run, oracle.py): what :func:`estimate` bills instead of its own where they differ."""

    weights: int
    kv: int  # KV cache and recurrent state
    compute: int
    output: int
    kv_layers: tuple[int, ...] = ()  # the same per layer, as llama.cpp's log lays it out (adds up to kv)


def estimate(summary: ModelSummary, placement: Placement, options: RunOptions,
             gpu_backend: str | Mapping[str, str] = "cuda",
             reference: Reference | None = None) -> dict[str, DeviceMemory]:
    """Bytes each device ("cpu", "gpu0", ...) needs to run ``summary`` placed as ``placement``.

    ``gpu_backend`` (cuda, rocm, vulkan, metal, rpc ..., or one per device as ``{"gpu0": "cuda",
    "rpc0": "rpc"}``) sets the fixed overhead per GPU and whether llama.cpp's op offloading copies
    host weights in (CUDA, ROCm, Vulkan do; Metal and RPC do not).
    ``options.swa_full`` mirrors llama_context_params.swa_full, which the engine sets from it.

    ``reference`` (llama.cpp's CPU-only figures at ``options``) overrides the model where the two
    differ: CPU only, its KV cache and compute buffer are billed as they are; split over
    devices, each layer's KV cache and recurrent state is llama.cpp's (``reference.kv_layers``, from
    its log; else its total spread in the proportions of :func:`kv_bytes_by_layer`), and every
    device with a compute buffer gets what this model's CPU compute buffer falls short of
    llama.cpp's on top of its own, and at least llama.cpp's whole-graph buffer where the two differ
    (a split of a graph this model does not rebuild is not trusted). Weights are the tensors' bytes where
    :mod:`moelocal.layout` puts them (CPU only: at least what llama.cpp holds).
    """
    weights = layout.bytes_by_device(summary, placement)
    layer_dev = layout.layer_devices(summary.n_layer, placement)
    kv: dict[str, int] = {}
    for il, n in enumerate(_kv_by_layer(summary, options, reference)):
        kv[layer_dev[il]] = kv.get(layer_dev[il], 0) + n
    compute = compute_by_device(summary, placement, options, gpu_backend)
    if reference is not None:
        own_cpu = compute_bytes(summary, options)
        if set(compute) == {CPU}:
            compute = {CPU: reference.compute}
            # llama.cpp holds more than the file's tensors (gemma4 copies its tied output head even
            # on the CPU): bill what it holds. Split over devices, layout counts the head's copy already.
            weights[CPU] = weights.get(CPU, 0) + max(0, reference.weights - sum(weights.values()))
        else:
            # what this model misses of llama.cpp's graph may run on any device that computes (the
            # CPU included: it runs the input layer, and host-resident experts): each gets it on top
            short = max(0, reference.compute - own_cpu)
            for d in compute:
                compute[d] += short
            if own_cpu != reference.compute:
                # a graph this model does not rebuild node for node: its split cannot be trusted
                # either (ops a backend lacks fall back to the CPU, a device's part can peak where
                # the model does not see it). The whole graph's buffer bounds what any part needs.
                for d in compute:
                    compute[d] = max(compute[d], reference.compute)
    # the engine opens the plan's devices only when layers go there; each then has a backend context
    on_gpu = bool(placement.devices) and placement.n_gpu_layers > 0
    out = {}
    for d in sorted({CPU, *weights, *kv, *compute, *placement.devices}, key=lambda x: (x != CPU, x)):
        on_device = on_gpu and d != CPU and d in placement.devices
        out[d] = DeviceMemory(
            weights=weights.get(d, 0), kv=kv.get(d, 0), compute=compute.get(d, 0),
            # the logits buffer is exact here; llama.cpp reports it only to 0.01 MiB
            output=output_bytes(summary, options) if d == CPU else 0,
            overhead=backend_overhead(_backend_of(gpu_backend, d)) if on_device else 0,
        )
    return out


def _kv_by_layer(summary: ModelSummary, options: RunOptions, reference: Reference | None) -> tuple[int, ...]:
    """kv_bytes_by_layer, rescaled to llama.cpp's total where a reference gives one."""
    own = kv_bytes_by_layer(summary, options)
    if reference is None:
        return own
    if reference.kv_layers and sum(reference.kv_layers) == reference.kv and len(reference.kv_layers) <= len(own):
        return tuple(reference.kv_layers) + (0,) * (len(own) - len(reference.kv_layers))
    if sum(own) == reference.kv:
        return own
    total = sum(own)
    if total == 0:  # llama.cpp keeps a state this model does not know of: spread it over the layers it runs
        n_run = _model(summary).n_layer
        own = tuple(1 if il < n_run else 0 for il in range(len(own)))
        total = sum(own)
    out = [reference.kv * n // total for n in own]
    last = max(i for i, n in enumerate(own) if n) if any(own) else 0
    out[last] += reference.kv - sum(out)  # the rounding, so that the total is llama.cpp's to the byte
    return tuple(out)


def _backend_of(gpu_backend: str | Mapping[str, str], device: str) -> str:
    if isinstance(gpu_backend, str):
        return gpu_backend.lower()
    return gpu_backend.get(device, "cuda").lower()


def compute_by_device(summary: ModelSummary, placement: Placement, options: RunOptions,
                      gpu_backend: str | Mapping[str, str] = "cuda") -> dict[str, int]:
    """Compute buffer bytes per device for a placement.

    CPU only: :func:`compute_bytes`. With GPUs, the same graph is cut the way llama.cpp's scheduler
    cuts it (:func:`_schedule`): each device allocates the nodes it runs plus copies of what it
    reads from other devices (activations at layer boundaries, the graph inputs, and, where op
    offloading applies, host-resident weights: with ``--n-cpu-moe`` one layer's experts, with
    fewer GPU layers whole CPU layers' matrices). Exact against llama.cpp over RPC (which does no
    op offloading); the op-offload copies follow ggml-backend.cpp and ggml-cuda.cu but could not be
    measured without a CUDA GPU.
    """
    on_gpu = bool(placement.devices) and placement.n_gpu_layers > 0
    if not on_gpu:
        return {CPU: compute_bytes(summary, options)}
    m = _model(summary)
    backends = tuple((d, _backend_of(gpu_backend, d)) for d in placement.devices)
    key = (id(summary), placement, graph_key(summary, options), backends)
    hit = _SPLITS.get(key)
    if hit is None or hit[0] is not summary:
        if len(_SPLITS) > 1024:
            _SPLITS.clear()
        hit = _SPLITS[key] = (summary, _compute_split(summary, placement, m, key[2], key[3]))
    return dict(hit[1])


_SPLITS: dict[tuple, tuple[ModelSummary, tuple[tuple[str, int], ...]]] = {}


def _compute_split(summary: ModelSummary, placement: Placement, m: _Model, key: _GraphKey,
                   backends: tuple[tuple[str, str], ...]) -> tuple[tuple[str, int], ...]:
    layer_dev = layout.layer_devices(summary.n_layer, placement)
    weights: dict[str, tuple[str, int]] = {}
    for loc in layout.locate(summary, placement):
        name = "output.weight" if loc.duplicate else loc.tensor.name
        weights[name] = (loc.device, loc.tensor.n_bytes)
    if "output.weight" not in weights and "token_embd.weight" in weights:
        weights["output.weight"] = weights["token_embd.weight"]  # tied head on the CPU: the same tensor
    g = _build_graph(m, key, weights, layer_dev, _kept_layers(m, weights, layer_dev))
    # ops on host weights go to the first GPU if its backend offloads (CUDA, ROCm, Vulkan, SYCL ...;
    # not Metal or RPC)
    offload = bool(backends) and backends[0][1] not in _NO_OP_OFFLOAD
    leafs, nodes = _schedule(g, [d for d, _ in backends] + [CPU], op_offload=offload)
    align = {CPU: _ALIGN["cpu"], **{d: _ALIGN.get(b, 32 if b == "rpc" else 128) for d, b in backends}}
    return tuple(sorted(_allocate(leafs, nodes, align).items()))
