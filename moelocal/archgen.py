"""Header-only GGUF models of any architecture the vendored llama.cpp knows, learned from its loader.

moelocal's own test models (testmodels.py) are written by hand, one architecture at a time. This
module writes a model of *any* architecture without knowing it in advance: it starts from the
standard hyperparameter keys, then lets llama.cpp's loader say what is missing, one no_alloc load
at a time (a load reads the header only, so each try takes milliseconds):

- ``key not found in model: X`` adds the key (a default by its name, :data:`KEY_DEFAULTS`);
- ``key X has wrong type T but expected type U`` and ``... wrong array length; expected N`` fix it;
- ``missing tensor 'X'`` adds the tensor, with the shape of the same tensor in an earlier layer
  where there is one (layers repeat), else a placeholder;
- ``tensor 'X' has wrong shape; expected A, B, ...`` gives the shape.

until the model loads. The result, a :class:`Recipe` (metadata and tensor shapes), is written as a
sparse file: the header, then a hole as large as the tensor data (:func:`write`). llama.cpp plans
such a file exactly as it plans the real model (measure.py), so every MoE architecture of the
vendored llama.cpp can be checked against moelocal's plans (tests/test_archs.py), and a new
llama.cpp with a new architecture shows up as a failing test instead of an OOM at a user's.

Which architectures exist and which are MoE is read from llama.cpp's sources (:func:`architectures`):
the names from ``llama-arch.cpp``, the model class of each from ``llama-model.cpp``, and whether
that class's ``load_arch_tensors`` (``models/*.cpp``, following base classes) creates routed-expert
tensors.

Learning a model needs llama.cpp and can hit a GGML_ASSERT (an abort, not an exception): run
:func:`learn` in a process of its own (``python -m moelocal.archgen ARCH``).
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# ggml types used for the tensors
F32, F16, Q8_0, I32 = 0, 1, 8, 26
_TYPE_BLOCK = {F32: (1, 4), F16: (1, 2), Q8_0: (32, 34), I32: (1, 4)}
ALIGNMENT = 32

# The tiny shape every architecture gets (n_embd 256, 4 heads of 64, 2 KV heads, 4 experts, 2 used)
N_LAYER = 4
N_EMBD = 256

# Defaults for hyperparameter keys llama.cpp asks for, by the key's name after "{arch}."
KEY_DEFAULTS: dict[str, Any] = {
    "context_length": 4096, "embedding_length": N_EMBD, "block_count": N_LAYER, "feed_forward_length": 512,
    "expert_feed_forward_length": 256, "expert_shared_feed_forward_length": 256, "expert_count": 4,
    "expert_used_count": 2, "expert_shared_count": 1, "expert_group_count": 1, "expert_group_used_count": 1,
    "expert_weights_scale": 1.0, "expert_weights_norm": True, "leading_dense_block_count": 1,
    "attention.head_count": 4, "attention.head_count_kv": 2, "attention.key_length": 64,
    "attention.value_length": 64, "attention.layer_norm_rms_epsilon": 1e-6, "attention.layer_norm_epsilon": 1e-5,
    "attention.group_norm_epsilon": 1e-5, "attention.group_norm_groups": 1, "attention.q_lora_rank": 128,
    "attention.kv_lora_rank": 64, "attention.key_length_mla": 96, "attention.value_length_mla": 64,
    "attention.sliding_window": 128, "attention.causal": True, "rope.dimension_count": 64,
    "rope.freq_base": 10000.0, "ssm.conv_kernel": 4, "ssm.inner_size": 128, "ssm.state_size": 16,
    "ssm.time_step_rank": 8, "ssm.group_count": 1, "wkv.head_size": 64, "full_attention_interval": 4,
    "interleave_moe_layer_step": 1, "moe_every_n_layers": 1, "nextn_predict_layers": 0, "vocab_size": 512,
    "shortconv.l_cache": 3, "kda.head_dim": 64, "attention.indexer.head_count": 2,
    "attention.indexer.key_length": 64, "attention.indexer.top_k": 64, "expert_gating_func": 1,
    # multimodal RoPE: four sections of the rotated half-head (rope.dimension_count / 2)
    "rope.dimension_sections": [11, 11, 10, 0],
}
# Per-architecture keys the loader does not ask for but the model needs to be an MoE model of that
# architecture (archs that are dense unless told otherwise), or to get past a check of its own.
_MLA = {"attention.head_count_kv": 1, "attention.q_lora_rank": 128, "attention.kv_lora_rank": 64,
        "attention.key_length": 96, "attention.value_length": 64, "attention.key_length_mla": 96,
        "attention.value_length_mla": 64, "rope.dimension_count": 32}
# gated delta nets (Qwen3.5 style): key heads of ssm.state_size, value heads (time_step_rank) of the
# same size, d_inner = the value heads' width
_DELTA = {"ssm.state_size": 32, "ssm.group_count": 4, "ssm.time_step_rank": 8, "ssm.inner_size": 256,
          "ssm.conv_kernel": 4, "full_attention_interval": 4, "rope.dimension_count": 16,
          "rope.dimension_sections": [3, 3, 2, 0], "attention.key_length": 64, "attention.value_length": 64}
# Kimi delta attention hybrids: recurrent KDA layers have no KV heads (head_count_kv 0, as the
# converters write it), the full-attention ones are MLA with the K-only latent cache of one KV head
# (K = kv_lora_rank + rope dims, V its first kv_lora_rank); without these every layer would be MLA
# with a K cache as wide as 2 heads of 64 and the graph's K/Q shapes would not match
_KDA = {"attention.head_count_kv": [0, 0, 0, 1], "attention.kv_lora_rank": 64, "rope.dimension_count": 32,
        "attention.key_length": 96, "attention.value_length": 64, "attention.key_length_mla": 96,
        "attention.value_length_mla": 64, "kda.head_dim": 64}
ARCH_KEYS: dict[str, dict[str, Any]] = {
    "qwen35moe": _DELTA, "qwen3next": _DELTA, "qwen4exp": {**_DELTA, "hyper_connection.count": 2},
    "deepseek2": _MLA, "mistral4": _MLA, "deepseek32": _MLA, "glm-dsa": _MLA,
    "deepseek4": {**_MLA, "expert_gating_func": 4,  # its loader wants sqrt-softplus routing
                  "attention.compress_ratios": [0, 4, 128, 0], "hyper_connection.count": 4,
                  "attention.value_length": 96, "attention.value_length_mla": 96},
    "dots3note": _MLA,
    "bailingmoe3": {**_KDA, "kda.gate_lower_bound": -5.0},
    "kimi-linear": _KDA, "kimi-k3": _KDA,
    # DeepSeek-V2 style MLA (its converter reuses DeepSeek's), sigmoid routing, 4 hyper-connection streams
    "hy_v4": {**_MLA, "hyper_connection.count": 4, "expert_gating_func": 2},
    # its converter writes the sliding window; without it the graph still asks for the SWA cache
    # llama.cpp did not make (a SIGSEGV in build_attn_inp_kv_iswa)
    "afmoe": {"attention.sliding_window": 128},
    "glm5-next": {**_MLA, "attention.indexer.kpool": 4, "attention.indexer.top_k": 64, "hyper_connection.count": 4,
                  "rope.dimension_count": 0, "attention.key_length": 64, "attention.key_length_mla": 64},
    "nomic-bert-moe": {"tokenizer.ggml.token_type_count": 2},
    # an optional key their shared expert's width comes from
    "nemotron_h": {"expert_shared_feed_forward_length": 256},
    "dflash": {"target_layers": [0, 1]},  # a draft model: which of its target's layers it reads
    "nemotron_h_moe": {"expert_shared_feed_forward_length": 256},
}

# Draft heads for speculative decoding: llama.cpp loads them alone, but makes a context of one only
# beside its target model's (llama_context_params.ctx_other): learned without the context check
DRAFT_HEADS: dict[str, str] = {
    "dflash": "a speculative-decoding draft head: llama.cpp makes a context of it only beside its target model's "
              "(llama_context_params.ctx_other), so a dry run of it alone fails by design",
}

# Per-layer tensors the loader treats as optional but the graph uses (a NULL tensor there is a
# SIGSEGV): seeded with a placeholder shape, which the loader's shape check then corrects.
# glm-dsa: a GLM 5/5.1 context (< 1M) makes every layer an indexer layer
ARCH_TENSORS: dict[str, tuple[str, ...]] = {
    "glm-dsa": ("indexer.k_norm.weight", "indexer.k_norm.bias", "indexer.proj.weight", "indexer.attn_k.weight",
                "indexer.attn_q_b.weight"),
}

_KEY_MISSING = re.compile(r"key not found in model: (\S+)")
_ARRAY_MISSING = re.compile(r"array key not found in model: (\S+)")
_KEY_TYPE = re.compile(r"key (\S+) has wrong type (\w+) but expected type (\w+)")
_KEY_LEN = re.compile(r"key (\S+) has wrong array length; expected (\d+), got (\d+)")
_SCALAR = re.compile(r"expected scalar, found array for key: (\S+)")
_TENSOR_MISSING = re.compile(r"missing tensor '([^']+)'|tensor '([^']+)' not found")
_TENSOR_SHAPE = re.compile(r"tensor '([^']+)' has wrong shape; expected ([-\d ,]+), got")
_BLK = re.compile(r"^blk\.(\d+)\.(.+)$")


@dataclass
class Recipe:
    """A model of one architecture: metadata (key -> (gguf type, value)) and tensors (name -> (shape, type))."""

    arch: str
    metadata: dict[str, tuple[str, Any]] = field(default_factory=dict)
    tensors: dict[str, tuple[tuple[int, ...], int]] = field(default_factory=dict)

    def to_json(self) -> dict:
        """Without the vocabulary (the same for every recipe: see :func:`from_json`)."""
        return {"arch": self.arch, "metadata": {k: list(v) for k, v in self.metadata.items() if k not in _VOCAB_KEYS},
                "tensors": {k: [list(s), t] for k, (s, t) in self.tensors.items()}}

    @classmethod
    def from_json(cls, d: dict) -> Recipe:
        recipe = cls(d["arch"], {k: (v[0], v[1]) for k, v in d["metadata"].items()},
                     {k: (tuple(v[0]), int(v[1])) for k, v in d["tensors"].items()})
        _vocab(recipe)
        return recipe


# ---- the architectures llama.cpp knows -------------------------------------------------------


def architectures(src: str | os.PathLike[str]) -> dict[str, bool]:
    """Every architecture name in ``src/llama-arch.cpp`` -> whether its tensor loader creates
    routed-expert tensors (``ffn_{gate,up,down,gate_up}_exps``), read from llama.cpp's sources."""
    src = Path(src)
    names = dict(re.findall(r'\{\s*(LLM_ARCH_\w+)\s*,\s*"([^"]+)"\s*\}', (src / "llama-arch.cpp").read_text()))
    mapping = dict(re.findall(r"case (LLM_ARCH_\w+):\s*return new (llama_model_\w+)\(",
                              (src / "llama-model.cpp").read_text()))
    models = src / "models"
    header = (models / "models.h").read_text() if (models / "models.h").is_file() else ""
    base = dict(re.findall(r"struct (llama_model_\w+)\s*:\s*public\s+(llama_model_\w+)", header))
    bodies: dict[str, str] = {}
    for f in sorted(models.glob("*.cpp")) if models.is_dir() else []:
        text = f.read_text()
        for m in re.finditer(r"void (llama_model_\w+)::load_arch_tensors\(", text):
            end = text.find("\n}\n", m.end())
            bodies[m.group(1)] = text[m.end(): end if end > 0 else None]
    out = {}
    for enum, name in names.items():
        if enum in ("LLM_ARCH_UNKNOWN", "LLM_ARCH_CLIP"):
            continue
        cls = mapping.get(enum)
        seen = set()
        while cls and cls not in bodies and cls not in seen:
            seen.add(cls)
            cls = base.get(cls)
        body = bodies.get(cls or "", "")
        out[name] = bool(re.search(r"LLM_TENSOR_FFN_(GATE_|UP_|DOWN_|GATE_UP_)EXPS", body))
    return out


def moe_architectures(src: str | os.PathLike[str]) -> list[str]:
    """The architectures of ``src`` whose models can have routed experts."""
    return [a for a, moe in architectures(src).items() if moe]


# ---- writing a GGUF header -------------------------------------------------------------------

_GGUF_TYPES = {"u8": 0, "i8": 1, "u16": 2, "i16": 3, "u32": 4, "i32": 5, "f32": 6, "bool": 7, "str": 8, "arr": 9,
               "u64": 10, "i64": 11, "f64": 12}
_FMT = {"u8": "<B", "i8": "<b", "u16": "<H", "i16": "<h", "u32": "<I", "i32": "<i", "f32": "<f", "bool": "<?",
        "u64": "<Q", "i64": "<q", "f64": "<d"}


def _str(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def _value(t: str, v: Any) -> bytes:
    if t == "str":
        return _str(v)
    if t.startswith("arr:"):
        et = t[4:]
        out = struct.pack("<IQ", _GGUF_TYPES[et], len(v))
        return out + b"".join(_str(x) if et == "str" else struct.pack(_FMT[et], x) for x in v)
    return struct.pack(_FMT[t], v)


def tensor_bytes(shape: tuple[int, ...], ggml_type: int) -> int:
    block, size = _TYPE_BLOCK[ggml_type]
    return math.prod(shape) // block * size


def encode(recipe: Recipe) -> tuple[bytes, int]:
    """(the GGUF header of ``recipe``, the size of the whole file) — the data is all zeros."""
    meta = {"general.architecture": ("str", recipe.arch), **recipe.metadata}
    parts = [b"GGUF", struct.pack("<IQQ", 3, len(recipe.tensors), len(meta))]
    for k, (t, v) in meta.items():
        tid = _GGUF_TYPES["arr"] if t.startswith("arr:") else _GGUF_TYPES[t]
        parts += [_str(k), struct.pack("<I", tid), _value(t, v)]
    offset = 0
    for name, (shape, ggml_type) in recipe.tensors.items():
        parts += [_str(name), struct.pack("<I", len(shape)), struct.pack(f"<{len(shape)}Q", *shape),
                  struct.pack("<IQ", ggml_type, offset)]
        offset += -(-tensor_bytes(shape, ggml_type) // ALIGNMENT) * ALIGNMENT
    head = b"".join(parts)
    head += b"\0" * (-len(head) % ALIGNMENT)
    return head, len(head) + offset


def write(recipe: Recipe, path: str | os.PathLike[str]) -> Path:
    """The model as a sparse file: its header, then a hole as large as its tensor data."""
    head, size = encode(recipe)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(head)
        fh.truncate(size)
    return path


# ---- learning a model from llama.cpp's loader ------------------------------------------------


def _typed(key: str, value: Any) -> tuple[str, Any]:
    if isinstance(value, bool):
        return "bool", value
    if isinstance(value, int):
        return "u32", value
    if isinstance(value, float):
        return "f32", value
    if isinstance(value, str):
        return "str", value
    if isinstance(value, list):
        first = value[0] if value else 0
        return "arr:" + _typed(key, first)[0], value
    raise TypeError(f"{key}: {value!r}")


def _default(key: str) -> Any:
    if key in KEY_DEFAULTS:
        return KEY_DEFAULTS[key]
    if key.endswith("_swa"):  # the sliding-window layers' own value: the same as the others'
        return _default(key[:-4])
    last = key.rsplit(".", 1)[-1]
    if "epsilon" in last or last.endswith("_eps"):
        return 1e-5
    if "scale" in last or "factor" in last or "freq_base" in last or "beta" in last or "softcapping" in last:
        return 1.0
    if last.endswith(("_length", "_size", "_rank", "_dim")):
        return 64
    return 1


def _convert(value: Any, t: str) -> Any:
    if isinstance(value, list):
        return [_convert(v, t) for v in value]
    if t == "bool":
        return bool(value)
    if t == "f32" or t == "f64":
        return float(value)
    if t == "str":
        return str(value)
    return int(value)


_VOCAB_KEYS = {"general.name", "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens",
               "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id",
               "tokenizer.ggml.eos_token_id"}


def _vocab(recipe: Recipe, n_vocab: int = 512) -> None:
    from moelocal.testmodels import vocabulary

    tokens, types, merges = vocabulary()
    pad = max(0, n_vocab - len(tokens))
    md = recipe.metadata
    md.setdefault("general.name", ("str", f"archgen {recipe.arch}"))
    md["tokenizer.ggml.model"] = ("str", "gpt2")
    md["tokenizer.ggml.pre"] = ("str", "default")
    md["tokenizer.ggml.tokens"] = ("arr:str", list(tokens) + [f"<|filler_{i}|>" for i in range(pad)])
    md["tokenizer.ggml.token_type"] = ("arr:i32", list(types) + [1] * pad)
    md["tokenizer.ggml.merges"] = ("arr:str", list(merges))
    md["tokenizer.ggml.bos_token_id"] = ("u32", 0)
    md["tokenizer.ggml.eos_token_id"] = ("u32", 1)


def _ggml_type(name: str, shape: tuple[int, ...]) -> int:
    """Matrices Q8_0 where their rows allow it (as in a quantized model), F16 otherwise; vectors,
    norms, routers, biases and recurrent parameters F32, as converters keep them."""
    if "tid2eid" in name:  # hash routing: the experts of each token id, gathered as indices
        return I32
    base = name.rsplit(".", 1)[-1]
    part = _BLK.match(name).group(2) if _BLK.match(name) else name
    if len(shape) < 2 or base != "weight" or "norm" in part or "gate_inp" in part or part.startswith("ssm_") \
            or "conv" in part or "exp_probs" in part or "time_mix" in part or "sinks" in part:
        return F32
    return Q8_0 if shape[0] % 32 == 0 else F16


def _load(path: Path) -> tuple[Any, list[tuple[int, str]]]:
    """A no_alloc load of ``path`` by moelocal's own model params: (llama.cpp's model or NULL, its log)."""
    from moelocal import native
    from moelocal.plan import Placement

    lc = native.llama()
    native.install_log()
    lc.llama_backend_init()
    mp, arrays = native.model_params(Placement(), extra_bufts=False)
    mp.no_alloc = True
    mp.load_mode = lc.LLAMA_LOAD_MODE_NONE
    with native.capture_log() as lines:
        model = lc.llama_model_load_from_file(os.fsencode(str(path)), mp)
    return model, lines


def model_size(path: Path) -> int | None:
    """The bytes of ``path``'s tensors as llama.cpp loads them (``llama_model_size``), None when it cannot:
    the weights of a model no context can be made of alone (a draft head)."""
    from moelocal import native

    model, _lines = _load(path)
    if not model:
        return None
    try:
        return int(native.llama().llama_model_size(model))
    finally:
        native.llama().llama_model_free(model)


def try_load(path: Path) -> str | None:
    """None when llama.cpp loads ``path`` (no_alloc), else its error ("missing tensor 'x'")."""
    from moelocal import native

    model, lines = _load(path)
    if model:
        native.llama().llama_model_free(model)
        return None
    for _level, line in lines:
        m = re.search(r"error loading model: (.*)", line)
        if m:
            return m.group(1).strip()
    return native.last_error(lines) or "llama.cpp could not load it"


def _check_context(recipe: Recipe, path: Path) -> None:
    """A context can be made too (llama.cpp builds the worst-case graph): an abort here ends the process."""
    from moelocal.errors import EngineError
    from moelocal.measure import measure
    from moelocal.plan import RunOptions

    for o in (RunOptions(n_ctx=1024, n_ubatch=128, flash_attn=True),
              RunOptions(n_ctx=2048, n_ubatch=256, flash_attn=False, n_seq=2)):
        try:
            measure(path, None, o)
        except EngineError as exc:
            raise LearnError(f"{recipe.arch}: {exc.message}") from None


class LearnError(Exception):
    """The loader said something the generator does not know how to answer."""


def learn(arch: str, work: str | os.PathLike[str], *, max_steps: int = 600,
          keys: dict[str, Any] | None = None) -> tuple[Recipe, int]:
    """A recipe of ``arch`` that llama.cpp loads, and how many loads it took (see the module doc)."""
    recipe = Recipe(arch)
    _vocab(recipe)
    start = {"block_count": N_LAYER, "embedding_length": N_EMBD, "context_length": 4096,
             "feed_forward_length": 512, "attention.head_count": 4, "attention.head_count_kv": 2,
             "attention.layer_norm_rms_epsilon": 1e-6, "expert_count": 4, "expert_used_count": 2,
             "expert_feed_forward_length": 256, "vocab_size": 512, "expert_gating_func": 1,
             **ARCH_KEYS.get(arch, {}), **(keys or {})}
    for k, v in start.items():
        recipe.metadata[f"{arch}.{k}" if not k.startswith(("general.", "tokenizer.")) else k] = _typed(k, v)
    for il in range(int(recipe.metadata[f"{arch}.block_count"][1])):
        for part in ARCH_TENSORS.get(arch, ()):
            name = f"blk.{il}.{part}"
            shape = (N_EMBD,) if "norm" in name or name.endswith(".bias") else (N_EMBD, N_EMBD)
            recipe.tensors[name] = (shape, _ggml_type(name, shape))
    path = Path(work) / f"{arch}.gguf"
    last = None
    for step in range(1, max_steps + 1):
        write(recipe, path)
        err = try_load(path)
        if err is None:
            if arch not in DRAFT_HEADS:
                _check_context(recipe, path)
            return recipe, step
        if err == last and not _TENSOR_MISSING.search(err):
            raise LearnError(f"{arch}: stuck at: {err}")
        last = err
        if not _answer(recipe, err):
            raise LearnError(f"{arch}: {err}")
    raise LearnError(f"{arch}: no load after {max_steps} tries (last: {last})")


def _answer(recipe: Recipe, err: str) -> bool:
    """Change ``recipe`` the way llama.cpp's error asks; False when it cannot tell how."""
    md, arch = recipe.metadata, recipe.arch
    n_layer = int(md.get(f"{arch}.block_count", ("u32", N_LAYER))[1])
    if m := _KEY_TYPE.search(err):
        key, want = m.group(1), m.group(3)
        t, v = md[key]
        if want == "arr":
            md[key] = _typed(key, [v] * n_layer)
        else:
            md[key] = (want, _convert(v[0] if isinstance(v, list) else v, want))
        return True
    if m := _KEY_LEN.search(err):
        key, n = m.group(1), int(m.group(2))
        t, v = md[key]
        v = list(v) if isinstance(v, list) else [v]
        md[key] = (t, (v * n)[:n] if v else [0] * n)
        return True
    if m := _SCALAR.search(err):
        key = m.group(1)
        t, v = md[key]
        md[key] = (t[4:], v[0])
        return True
    if m := _ARRAY_MISSING.search(err) or _KEY_MISSING.search(err):
        key = m.group(1)
        if key in md:
            return False
        short = key[len(arch) + 1:] if key.startswith(arch + ".") else key
        value = _default(short)
        if _ARRAY_MISSING.search(err):
            value = [value] * n_layer
        md[key] = _typed(short, value)
        return True
    if m := _TENSOR_SHAPE.search(err):
        name = m.group(1)
        shape = tuple(int(x) for x in m.group(2).replace(" ", "").split(",") if x)
        if min(shape) <= 0:  # derived from a key the loader did not ask for: ARCH_KEYS must give it
            raise LearnError(f"{arch}: {name} would be {shape}: a hyperparameter is missing (see ARCH_KEYS)")
        recipe.tensors[name] = (shape, _ggml_type(name, shape))
        return True
    if m := _TENSOR_MISSING.search(err):
        name = m.group(1) or m.group(2)
        if name in recipe.tensors:
            return False
        # a guess (the loader's shape check corrects it); some loaders check widths themselves first
        shape = (N_EMBD,) if "norm" in name or name.endswith(".bias") else (N_EMBD, N_EMBD)
        b = _BLK.match(name)
        if b:  # the same tensor of the nearest layer below: layers repeat
            il, part = int(b.group(1)), b.group(2)
            for j in range(il - 1, -1, -1):
                prev = recipe.tensors.get(f"blk.{j}.{part}")
                if prev:
                    shape = prev[0]
                    break
        recipe.tensors[name] = (shape, _ggml_type(name, shape))
        return True
    return False


# What to try when a model loads but llama.cpp cannot build its graph (an abort, a crash): some
# graphs need as many KV heads as query heads (Q/K norms over the whole width), or a gating function
# the file must state
PROFILES: tuple[dict[str, Any], ...] = (
    {}, {"attention.head_count_kv": 4}, {"expert_gating_func": 2}, {"attention.head_count_kv": 4,
                                                                     "expert_gating_func": 2},
)


def learn_isolated(arch: str, timeout: float = 300) -> dict:
    """:func:`learn` in a child process (llama.cpp may abort), trying :data:`PROFILES` in turn: the
    recipe as JSON, or {"error": ...}."""
    errors = []
    for keys in PROFILES:
        d = _learn_child(arch, keys, timeout)
        if "error" not in d:
            return d
        errors.append(d["error"])
        if "aborts" not in d["error"] and "crashes" not in d["error"] and "context" not in d["error"]:
            break  # the loader itself gave up: other keys will not help
    return {"arch": arch, "error": errors[0]}


def _learn_child(arch: str, keys: dict[str, Any], timeout: float) -> dict:
    import subprocess

    here = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": here + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "GGML_NO_BACKTRACE": "1"}
    try:
        proc = subprocess.run([sys.executable, "-m", "moelocal.archgen", arch, "--keys", json.dumps(keys)],
                              capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"arch": arch, "error": f"learning took more than {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    why = next((ln.strip() for ln in proc.stderr.splitlines() if "GGML_ASSERT" in ln or ": error" in ln), "")
    if why:
        return {"arch": arch, "error": "llama.cpp aborts: " + why.rsplit("/", 1)[-1]}
    return {"arch": arch, "error": f"llama.cpp crashes (exit code {proc.returncode})"}


def learn_all(src: str | os.PathLike[str], out: str | os.PathLike[str]) -> dict[str, dict]:
    """Learn every MoE architecture of llama.cpp's sources ``src`` and write the recipes to ``out``."""
    recipes = {}
    for arch in moe_architectures(src):
        recipes[arch] = learn_isolated(arch)
        print(f"{arch}: {recipes[arch].get('error') or 'ok'}", file=sys.stderr)
    write_recipes(recipes, out)
    return recipes


def write_recipes(recipes: dict[str, dict], out: str | os.PathLike[str]) -> None:
    """The recipes as JSON, one architecture a line (a new llama.cpp changes few lines)."""
    lines = [f"{json.dumps(a)}: {json.dumps(recipes[a], separators=(',', ':'))}" for a in sorted(recipes)]
    Path(out).write_text("{\n" + ",\n".join(lines) + "\n}\n")


def main(argv: list[str] | None = None) -> None:
    """``python -m moelocal.archgen ARCH [--keys JSON]``: learn ARCH and print its recipe as JSON;
    ``python -m moelocal.archgen --all LLAMA_SRC OUT.json``: every MoE architecture of LLAMA_SRC."""
    import tempfile

    args = sys.argv[1:] if argv is None else argv
    if args and args[0] == "--all":
        learn_all(args[1], args[2])
        return
    keys = json.loads(args[args.index("--keys") + 1]) if "--keys" in args else None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            recipe, steps = learn(args[0], tmp, keys=keys)
        except LearnError as exc:
            print(json.dumps({"arch": args[0], "error": str(exc)}))
            return
        print(json.dumps({**recipe.to_json(), "steps": steps}))


if __name__ == "__main__":
    main()
