"""GGUF header → ModelSummary: hyperparameters and a tensor inventory with roles and exact bytes.

This is the only module that reads GGUF bytes. It parses the header itself (rather than through
``gguf.GGUFReader``) because it must work on a *prefix* of a file, as fetched from the Hub with a
range request, and must refuse absurd counts before it allocates anything.
"""

from __future__ import annotations

import functools
import math
import mmap
import os
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from moelocal.errors import GGUFFormatError, ModelFileError, NeedMoreBytes


def _gguf_constants():
    """The gguf package's table of ggml types, without the package: ``import gguf`` brings numpy and
    its writers along (~170 ms, a sixth of a warm ``fit``), and its constants module needs neither."""
    import importlib.util
    import sys

    if "gguf.constants" in sys.modules:
        return sys.modules["gguf.constants"]
    spec = importlib.util.find_spec("gguf")  # locates the package without running its __init__
    origin = spec.origin if spec is not None else None
    if origin is None:
        import gguf.constants

        return gguf.constants
    path = Path(origin).with_name("constants.py")
    mod_spec = importlib.util.spec_from_file_location("moelocal._gguf_constants", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module


_constants = _gguf_constants()
GGML_QUANT_SIZES, GGMLQuantizationType = _constants.GGML_QUANT_SIZES, _constants.GGMLQuantizationType

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# Bounds that no real model comes near; a header claiming more is corrupt or hostile.
MAX_TENSORS = 1 << 20
MAX_KV = 1 << 16
MAX_STRING = 1 << 26  # 64 MiB: chat templates are kilobytes, tokens bytes
MAX_ARRAY = 1 << 26
MAX_DIMS = 8
# Arrays longer than this (vocabularies, merges) are skipped; only their length is kept.
KEEP_ARRAY = 4096

ROLES = (
    "routed_experts",
    "shared_experts",
    "router",
    "attention",
    "recurrent",
    "dense_ffn",
    "embeddings",
    "output",
    "norm",
    "other",
)

_SPLIT_RE = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
_BLK_RE = re.compile(r"^blk\.(\d+)\.(.+)$")

# GGUF value types: id -> (struct format, size) for the fixed-size ones.
_SCALARS = {
    0: ("<B", 1),
    1: ("<b", 1),
    2: ("<H", 2),
    3: ("<h", 2),
    4: ("<I", 4),
    5: ("<i", 4),
    6: ("<f", 4),
    7: ("<?", 1),
    10: ("<Q", 8),
    11: ("<q", 8),
    12: ("<d", 8),
}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class ArrayInfo:
    """A metadata array too long to keep (a vocabulary): its element type and length only."""

    type: int
    count: int

    def __len__(self) -> int:
        return self.count


@dataclass(frozen=True)
class RawTensor:
    name: str
    shape: tuple[int, ...]  # ggml order: shape[0] is the contiguous dimension
    ggml_type: int
    offset: int


@dataclass(frozen=True)
class Header:
    """The parsed header of one GGUF file; ``size`` is how many bytes the header spans."""

    version: int
    metadata: Mapping[str, Any]
    tensors: tuple[RawTensor, ...]
    alignment: int
    data_offset: int
    # where llama.cpp can read this header again (its dry run, see oracle.py): the local file it was
    # read from, or the header's own bytes when it came as a prefix (a Hub header)
    path: str | None = field(default=None, repr=False, compare=False)
    raw: bytes | None = field(default=None, repr=False, compare=False)

    @property
    def tensor_end(self) -> int:
        """Where the last tensor's data ends: the size a file with this header must have at least."""
        end = self.data_offset if self.tensors else 0
        for t in self.tensors:
            try:
                end = max(end, self.data_offset + t.offset + tensor_nbytes(t.shape, t.ggml_type))
            except GGUFFormatError:
                pass
        return end


@dataclass(frozen=True)
class HeaderSource:
    """One file of a model as llama.cpp's dry run needs it: a local file, or its header's bytes
    (written before a hole of ``size`` bytes, see measure.write_sparse)."""

    path: str | None
    raw: bytes | None
    size: int
    header_size: int = 0  # bytes of the header (its data offset)


@dataclass(frozen=True)
class TensorInfo:
    name: str
    role: str
    layer: int | None
    ggml_type: str
    shape: tuple[int, ...]
    n_params: int
    n_bytes: int


@dataclass(frozen=True)
class ModelSummary:
    """Everything moelocal knows about a model before loading it, read from GGUF headers alone."""

    architecture: str
    name: str
    files: tuple[str, ...]
    file_size: int
    n_layer: int
    n_embd: int
    n_vocab: int
    context_length: int
    n_head: tuple[int, ...]  # per layer; 0 for layers without attention
    n_head_kv: tuple[int, ...]  # per layer
    head_dim_k: int
    head_dim_v: int
    n_ff: int
    n_expert: int
    n_expert_used: int
    n_expert_shared: int
    expert_ff: int
    shared_expert_ff: int
    leading_dense_layers: int
    sliding_window: int
    swa_layers: tuple[bool, ...]  # per layer: True where attention is sliding-window
    q_lora_rank: int
    kv_lora_rank: int
    rope_dim: int
    recurrent_layers: tuple[int, ...]
    tensors: tuple[TensorInfo, ...]
    metadata: Mapping[str, Any] = field(repr=False, compare=False)
    unknown_tensors: tuple[str, ...] = ()
    sources: tuple[HeaderSource, ...] = field(default=(), repr=False, compare=False)

    # A summary is a key of the planner's caches (layout, memory); the hash generated for a frozen
    # dataclass walks every TensorInfo on each lookup (thousands per fit), so it is computed once.
    @functools.cached_property
    def _hash(self) -> int:
        return hash((self.architecture, self.name, self.files, self.file_size, self.tensors))

    def __hash__(self) -> int:
        return self._hash

    # ---- what llama.cpp loads ----------------------------------------------------------------
    @property
    def mtp_layers(self) -> tuple[int, ...]:
        """The multi-token-prediction (nextn) layers at the end of the block list, if any."""
        n = int(self.meta("nextn_predict_layers", 0) or 0)
        return tuple(range(self.n_layer - n, self.n_layer)) if 0 < n < self.n_layer else ()

    @property
    def loaded_tensors(self) -> tuple[TensorInfo, ...]:
        """The tensors llama.cpp loads: all, except the MTP layers' where its loader leaves them
        out (it does unless llama_model_params.load_mtp is set, which moelocal never sets)."""
        mtp = self.mtp_layers
        if not mtp or self.architecture not in MTP_SKIPPED_ARCHS:
            return self.tensors
        return tuple(t for t in self.tensors if t.layer is None or t.layer < mtp[0])

    # ---- totals -------------------------------------------------------------------------------
    @property
    def params_total(self) -> int:
        return sum(t.n_params for t in self.tensors)

    @property
    def tensor_bytes(self) -> int:
        return sum(t.n_bytes for t in self.tensors)

    @property
    def params_active(self) -> int:
        """Parameters one token touches: all but the routed experts, plus n_used/n_expert of them."""
        routed = sum(t.n_params for t in self.tensors if t.role == "routed_experts")
        rest = self.params_total - routed
        if not self.n_expert:
            return self.params_total
        return rest + routed * self.n_expert_used // self.n_expert

    @property
    def bytes_by_role(self) -> dict[str, int]:
        out = dict.fromkeys(ROLES, 0)
        for t in self.tensors:
            out[t.role] += t.n_bytes
        return {k: v for k, v in out.items() if v}

    @property
    def params_by_role(self) -> dict[str, int]:
        out = dict.fromkeys(ROLES, 0)
        for t in self.tensors:
            out[t.role] += t.n_params
        return {k: v for k, v in out.items() if v}

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.tensor_bytes / self.params_total if self.params_total else 0.0

    @property
    def is_moe(self) -> bool:
        return self.n_expert > 1 and any(t.role == "routed_experts" for t in self.tensors)

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(sorted({t.layer for t in self.tensors if t.role == "routed_experts" and t.layer is not None}))

    @property
    def quantization(self) -> str:
        """The dominant weight type, by bytes of the routed experts (or all weights if dense)."""
        pool = [t for t in self.tensors if t.role == "routed_experts"] or [
            t for t in self.tensors if len(t.shape) >= 2
        ]
        by_type: dict[str, int] = {}
        for t in pool:
            by_type[t.ggml_type] = by_type.get(t.ggml_type, 0) + t.n_bytes
        return max(by_type, key=by_type.__getitem__) if by_type else "unknown"

    def layer_bytes(self, layer: int, role: str | None = None) -> int:
        return sum(t.n_bytes for t in self.tensors if t.layer == layer and (role is None or t.role == role))

    def meta(self, key: str, default: Any = None) -> Any:
        """An architecture-scoped metadata value: ``meta("expert_count")`` reads ``{arch}.expert_count``."""
        return self.metadata.get(f"{self.architecture}.{key}", default)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form `inspect --json` prints (and `fit --json` embeds)."""
        return {
            "architecture": self.architecture,
            "name": self.name,
            "files": list(self.files),
            "file_size": self.file_size,
            "quantization": self.quantization,
            "n_layer": self.n_layer,
            "n_embd": self.n_embd,
            "n_vocab": self.n_vocab,
            "n_head": _squash(self.n_head),
            "n_head_kv": _squash(self.n_head_kv),
            "head_dim_k": self.head_dim_k,
            "head_dim_v": self.head_dim_v,
            "context_length": self.context_length,
            "n_expert": self.n_expert,
            "n_expert_used": self.n_expert_used,
            "n_expert_shared": self.n_expert_shared,
            "expert_ff": self.expert_ff,
            "leading_dense_layers": self.leading_dense_layers,
            "sliding_window": self.sliding_window,
            "swa_layers": [i for i, s in enumerate(self.swa_layers) if s],
            "q_lora_rank": self.q_lora_rank,
            "kv_lora_rank": self.kv_lora_rank,
            "recurrent_layers": list(self.recurrent_layers),
            "mtp_layers": list(self.mtp_layers),
            "params_total": self.params_total,
            "params_active": self.params_active,
            "bits_per_weight": round(self.bits_per_weight, 3),
            "bytes_by_role": self.bytes_by_role,
            "params_by_role": self.params_by_role,
            "n_tensors": len(self.tensors),
            "unknown_tensors": list(self.unknown_tensors),
        }


def _squash(values: tuple[int, ...]) -> int | list[int]:
    """One number when every layer agrees, else the per-layer list."""
    nonzero = {v for v in values if v}
    return nonzero.pop() if len(nonzero) == 1 and all(values) else list(values)


# ---- parsing ---------------------------------------------------------------------------------


class _Cursor:
    """Reads little-endian values from a buffer; running out raises NeedMoreBytes or, when the
    buffer is the whole file, a GGUFFormatError saying it is truncated."""

    __slots__ = ("buf", "pos", "complete", "label")

    def __init__(self, buf: bytes | memoryview | mmap.mmap, complete: bool, label: str) -> None:
        self.buf = buf
        self.pos = 0
        self.complete = complete
        self.label = label

    def need(self, n: int) -> None:
        end = self.pos + n
        if end > len(self.buf):
            if self.complete:
                raise GGUFFormatError(
                    f"{self.label} is truncated: its header ends early (at byte {len(self.buf)})",
                    "the download may be incomplete; fetch the file again",
                )
            raise NeedMoreBytes(end)

    def scalar(self, fmt: str, size: int) -> Any:
        self.need(size)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def u32(self) -> int:
        return self.scalar("<I", 4)

    def u64(self) -> int:
        return self.scalar("<Q", 8)

    def string(self) -> str:
        n = self.u64()
        if n > MAX_STRING:
            raise GGUFFormatError(f"{self.label} has a corrupt header: a string claims {n} bytes")
        self.need(n)
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def skip_string(self) -> None:
        n = self.u64()
        if n > MAX_STRING:
            raise GGUFFormatError(f"{self.label} has a corrupt header: a string claims {n} bytes")
        self.need(n)
        self.pos += n

    def _skip_strings(self, count: int) -> None:
        """skip_string ``count`` times in one tight loop: a vocabulary is 150k+ strings, and this is
        most of what reading a header costs. Where the buffer runs out, skip_string says so."""
        buf, pos, end = self.buf, self.pos, len(self.buf)
        unpack = struct.Struct("<Q").unpack_from
        while count and pos + 8 <= end:
            (n,) = unpack(buf, pos)
            if n > MAX_STRING or pos + 8 + n > end:
                break
            pos += 8 + n
            count -= 1
        self.pos = pos
        for _ in range(count):  # the string the loop stopped at: a corrupt length or the end of the buffer
            self.skip_string()

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self.scalar(*_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype = self.u32()
            count = self.u64()
            if count > MAX_ARRAY:
                raise GGUFFormatError(f"{self.label} has a corrupt header: an array claims {count} items")
            if etype in _SCALARS:
                fmt, size = _SCALARS[etype]
                self.need(size * count)
                if count > KEEP_ARRAY:
                    self.pos += size * count
                    return ArrayInfo(etype, count)
                values = list(struct.unpack_from(f"<{count}{fmt[1]}", self.buf, self.pos))
                self.pos += size * count
                return values
            if etype == _STRING:
                # Each string needs at least its 8-byte length: reject impossible counts at once.
                if self.complete and count * 8 > len(self.buf) - self.pos:
                    raise GGUFFormatError(
                        f"{self.label} has a corrupt header: an array claims {count} strings"
                    )
                if count > KEEP_ARRAY:
                    self._skip_strings(count)
                    return ArrayInfo(etype, count)
                return [self.string() for _ in range(count)]
            if etype == _ARRAY:
                if count > KEEP_ARRAY:
                    raise GGUFFormatError(f"{self.label} has a corrupt header: nested array of {count}")
                return [self.value(_ARRAY) for _ in range(count)]
            raise GGUFFormatError(f"{self.label} has a corrupt header: unknown array type {etype}")
        raise GGUFFormatError(f"{self.label} has a corrupt header: unknown value type {vtype}")


def parse_header(buf: bytes | memoryview | mmap.mmap, complete: bool = True, label: str = "file") -> Header:
    """Parse a GGUF header from ``buf``.

    With ``complete=False`` the buffer is a prefix of the file, and a header that runs past it raises
    :class:`NeedMoreBytes` with a lower bound on the bytes needed, so callers can fetch more.
    """
    cur = _Cursor(buf, complete, label)
    cur.need(4)
    if bytes(buf[:4]) != GGUF_MAGIC:
        raise GGUFFormatError(
            f"{label} is not a GGUF model (it does not start with the GGUF magic bytes)",
            "moelocal runs llama.cpp GGUF files; convert other formats with llama.cpp's convert_hf_to_gguf.py",
        )
    cur.pos = 4
    version = cur.u32()
    if version not in (2, 3):
        raise GGUFFormatError(f"{label} uses GGUF version {version}; moelocal reads versions 2 and 3")
    n_tensors = cur.u64()
    n_kv = cur.u64()
    if n_tensors > MAX_TENSORS or n_kv > MAX_KV:
        raise GGUFFormatError(
            f"{label} has a corrupt header: it claims {n_tensors} tensors and {n_kv} metadata keys"
        )
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        metadata[key] = cur.value(cur.u32())
    tensors = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.u32()
        if not 0 < n_dims <= MAX_DIMS:
            raise GGUFFormatError(f"{label} has a corrupt header: tensor {name!r} has {n_dims} dimensions")
        shape = tuple(cur.u64() for _ in range(n_dims))
        ggml_type = cur.u32()
        offset = cur.u64()
        tensors.append(RawTensor(name, shape, ggml_type, offset))
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise GGUFFormatError(f"{label} has a corrupt header: alignment {alignment!r}")
    data_offset = -(-cur.pos // alignment) * alignment
    # a prefix from the Hub keeps its bytes for llama.cpp's dry run; a local file is read again from disk
    raw = None if isinstance(buf, mmap.mmap) else bytes(buf[: min(len(buf), data_offset)])
    return Header(version, MappingProxyType(metadata), tuple(tensors), alignment, data_offset, raw=raw)


def tensor_nbytes(shape: tuple[int, ...], ggml_type: int, label: str = "file", name: str = "") -> int:
    """Exact bytes of a tensor of this shape and ggml type."""
    try:
        qtype = GGMLQuantizationType(ggml_type)
        block, size = GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
        raise GGUFFormatError(
            f"{label}: tensor {name!r} has ggml type {ggml_type}, which this version of moelocal does not know",
            "upgrade moelocal and its gguf package",
        ) from None
    n = math.prod(shape)
    if shape[0] % block:
        raise GGUFFormatError(f"{label}: tensor {name!r} has a row of {shape[0]}, not a multiple of {block}")
    return n // block * size


def type_name(ggml_type: int) -> str:
    try:
        return GGMLQuantizationType(ggml_type).name
    except ValueError:
        return f"type{ggml_type}"


# ---- roles -----------------------------------------------------------------------------------


def tensor_role(name: str) -> tuple[str, int | None, bool]:
    """(role, layer, known) for a tensor name as llama.cpp writes them."""
    base = name.rsplit(".", 1)[0] if name.endswith((".weight", ".bias", ".scale")) else name
    m = _BLK_RE.match(base)
    if not m:
        if base in ("token_embd", "token_types", "position_embd", "per_layer_token_embd"):
            return "embeddings", None, True
        if base in ("output", "cls", "cls.output"):
            return "output", None, True
        if "norm" in base:
            return "norm", None, True
        if base in ("rope_freqs", "rope_factors_long", "rope_factors_short"):
            return "other", None, True
        return "other", None, False
    layer, part = int(m.group(1)), m.group(2)
    if "_exps" in part:
        return "routed_experts", layer, True
    if "shexp" in part:
        return "shared_experts", layer, True
    if part.startswith("ffn_gate_inp") or part.startswith("exp_probs"):
        return "router", layer, True
    if "norm" in part:
        return "norm", layer, True
    if part.startswith(("attn_", "wkv_", "indexer")) or part in ("attn", "rope_freqs"):
        return "attention", layer, True
    if part.startswith(("ssm_", "time_mix_", "channel_mix_", "shortconv")):
        return "recurrent", layer, True
    if part.startswith(("ffn_gate", "ffn_up", "ffn_down", "ffn_act")):
        return "dense_ffn", layer, True
    if part.startswith(("nextn.", "layer_output_scale")):
        return "other", layer, True
    return "other", layer, False


# ---- files -----------------------------------------------------------------------------------


def split_set(path: Path) -> list[Path]:
    """All shards of a split set ``stem-0000i-of-0000N.gguf`` given any one of them (else [path])."""
    m = _SPLIT_RE.match(path.name)
    if not m:
        return [path]
    count = int(m.group("count"))
    shards = [path.with_name(f"{m.group('stem')}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    missing = [p.name for p in shards if not p.is_file()]
    if missing:
        raise ModelFileError(
            f"{path.name} is one of {count} split files, and {len(missing)} are missing: {', '.join(missing[:3])}",
            "download every part of the split set into the same folder",
        )
    return shards


def read_header_file(path: Path) -> tuple[Header, int]:
    """Parse one GGUF file's header and check its tensor data is all there; returns (header, size)."""
    label = path.name
    if not path.exists():
        raise ModelFileError(f"{path} does not exist", "check the path, or give a Hugging Face repo as org/name")
    if path.is_dir():
        raise ModelFileError(f"{path} is a directory, not a GGUF file", "give the path of a .gguf file inside it")
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            if size == 0:
                raise GGUFFormatError(f"{label} is empty, not a GGUF model")
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                header = parse_header(mm, complete=True, label=label)
    except PermissionError:
        raise ModelFileError(f"{path} cannot be read (permission denied)") from None
    except OSError as exc:
        raise ModelFileError(f"{path} cannot be read: {exc.strerror or exc}") from None
    end = header.data_offset if header.tensors else 0  # no tensors, no padding needed (as llama.cpp reads it)
    for t in header.tensors:
        end = max(end, header.data_offset + t.offset + tensor_nbytes(t.shape, t.ggml_type, label, t.name))
    if end > size:
        raise GGUFFormatError(
            f"{label} is truncated: its tensors need {end} bytes but the file has {size}",
            "the download is incomplete; run `moelocal pull` again or re-download the file",
        )
    return replace(header, path=str(path)), size


def read_summary(path: str | os.PathLike[str]) -> ModelSummary:
    """Read a local GGUF model (any shard of a split set) into a ModelSummary."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelFileError(f"{path} does not exist", "check the path, or give a Hugging Face repo as org/name")
    shards = split_set(path) if path.is_file() else [path]
    parsed = [read_header_file(p) for p in shards]
    return summarize([h for h, _ in parsed], [str(p) for p in shards], sum(s for _, s in parsed))


def summarize(headers: list[Header], files: list[str], file_size: int) -> ModelSummary:
    """Build the summary from the headers of one model (several for a split set)."""
    meta: dict[str, Any] = {}
    for h in headers:
        for k, v in h.metadata.items():
            meta.setdefault(k, v)
    label = Path(files[0]).name if files else "model"
    arch = meta.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise GGUFFormatError(f"{label} has no general.architecture key; it is not a llama.cpp model")

    def get(key: str, default: Any = 0) -> Any:
        return meta.get(f"{arch}.{key}", default)

    n_layer = int(get("block_count", 0))
    if n_layer <= 0 or n_layer > 10_000:
        raise GGUFFormatError(f"{label}: {arch}.block_count is {n_layer!r}")

    def per_layer(key: str, default: int = 0) -> tuple[int, ...]:
        value = get(key, default)
        if isinstance(value, list):
            if len(value) != n_layer:
                raise GGUFFormatError(f"{label}: {arch}.{key} has {len(value)} entries for {n_layer} layers")
            return tuple(int(v) for v in value)
        return (int(value),) * n_layer

    n_embd = int(get("embedding_length", 0))
    n_head = per_layer("attention.head_count")
    n_head_kv = per_layer("attention.head_count_kv", 0)
    if not any(n_head_kv):
        n_head_kv = n_head
    head0 = max(n_head) if n_head else 0
    head_dim_k = int(get("attention.key_length", n_embd // head0 if head0 else 0))
    head_dim_v = int(get("attention.value_length", head_dim_k))

    window = int(get("attention.sliding_window", _DEFAULT_WINDOW.get(arch, 0)))
    swa_layers = _swa_layers(arch, n_layer, window, get("attention.sliding_window_pattern", None))

    recurrent = _recurrent_layers(arch, n_layer, meta, n_head_kv)

    tensors = []
    unknown = []
    for h in headers:
        for t in h.tensors:
            role, layer, known = tensor_role(t.name)
            if not known:
                unknown.append(t.name)
            tensors.append(
                TensorInfo(
                    name=t.name,
                    role=role,
                    layer=layer,
                    ggml_type=type_name(t.ggml_type),
                    shape=t.shape,
                    n_params=math.prod(t.shape),
                    n_bytes=tensor_nbytes(t.shape, t.ggml_type, label, t.name),
                )
            )
    tokens = meta.get("tokenizer.ggml.tokens")
    n_vocab = int(get("vocab_size", 0)) or (len(tokens) if tokens is not None else 0)
    name = meta.get("general.name")
    if not isinstance(name, str) or not name.strip() or name.strip().lower() in _NO_NAME:
        name = _file_label(files[0]) if files else arch  # converters write "n/a" when they know none
    sources = tuple(HeaderSource(h.path, None if h.path else h.raw, max(h.tensor_end, h.data_offset), h.data_offset)
                    for h in headers if h.path or h.raw is not None)
    return ModelSummary(
        architecture=arch,
        name=str(name),
        files=tuple(files),
        file_size=file_size,
        n_layer=n_layer,
        n_embd=n_embd,
        n_vocab=n_vocab,
        context_length=int(get("context_length", 0)),
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim_k=head_dim_k,
        head_dim_v=head_dim_v,
        n_ff=_first_int(get("feed_forward_length", 0)),
        n_expert=int(get("expert_count", 0)),
        n_expert_used=_first_int(get("expert_used_count", 0)),
        # Qwen2-MoE has one shared expert and no key saying so
        n_expert_shared=int(get("expert_shared_count", 0)) or int(_ffn_width(tensors, "ffn_down_shexp") > 0),
        # Mixtral states the expert width as feed_forward_length; DeepSeek has no key for the shared one
        expert_ff=_first_int(get("expert_feed_forward_length", 0)) or _ffn_width(tensors, "ffn_down_exps"),
        shared_expert_ff=_first_int(get("expert_shared_feed_forward_length", 0))
        or _ffn_width(tensors, "ffn_down_shexp"),
        leading_dense_layers=int(get("leading_dense_block_count", 0)),
        sliding_window=window,
        swa_layers=swa_layers,
        q_lora_rank=int(get("attention.q_lora_rank", 0)),
        kv_lora_rank=int(get("attention.kv_lora_rank", 0)),
        rope_dim=int(get("rope.dimension_count", head_dim_k)),
        recurrent_layers=recurrent,
        tensors=tuple(tensors),
        metadata=MappingProxyType(meta),
        unknown_tensors=tuple(unknown),
        sources=sources if len(sources) == len(headers) else (),
    )


_NO_NAME = {"n/a", "na", "none", "null", "unknown", "-"}


def _file_label(path: str) -> str:
    """A model's name from its file: the stem, without a split set's -0000i-of-0000N."""
    name = Path(path).name
    m = _SPLIT_RE.match(name)
    return m.group("stem") if m else Path(name).stem


def _ffn_width(tensors: list[TensorInfo], part: str) -> int:
    """The inner width of an FFN read from its down projection (rows of ``part``), 0 if it has none."""
    suffix = f".{part}.weight"
    return max((t.shape[0] for t in tensors if t.name.endswith(suffix) and t.name.startswith("blk.")), default=0)


def _first_int(value: Any) -> int:
    if isinstance(value, list):
        return int(max(value)) if value else 0
    return int(value or 0)


# Sliding (or chunked) windows llama.cpp assumes when a file does not give one: Llama 4 attends in
# chunks of 8192 tokens on three layers of four (models/llama4.cpp), unless the file says 0
_DEFAULT_WINDOW = {"llama4": 8192}
_DEFAULT_PATTERN = {"llama4": 4}


def _swa_layers(arch: str, n_layer: int, window: int, pattern: Any) -> tuple[bool, ...]:
    """Which layers use sliding-window attention, as llama.cpp decides for the architecture."""
    if not window:
        return (False,) * n_layer
    if pattern is None:
        pattern = _DEFAULT_PATTERN.get(arch)
    if isinstance(pattern, list):  # explicit per-layer booleans
        return tuple(bool(p) for p in pattern[:n_layer])
    if isinstance(pattern, int) and pattern > 0:
        # llama.cpp's set_swa_pattern(n): every n-th layer (the last of each group) is dense
        return tuple((il % pattern) < (pattern - 1) for il in range(n_layer))
    if arch == "gpt-oss":  # alternating, starting with a sliding-window layer
        return tuple(il % 2 == 0 for il in range(n_layer))
    return (True,) * n_layer


# Architectures whose loader skips the MTP (nextn) layers unless load_mtp is set: llama.cpp's
# models/*.cpp that mark those tensors TENSOR_SKIP (deepseek2.cpp, glm4-moe.cpp, qwen35moe.cpp ...)
MTP_SKIPPED_ARCHS = frozenset({
    "bailingmoe3", "cohere2moe", "deepseek2", "deepseek32", "deepseek4", "glm-dsa", "glm4moe", "glm5-next",
    "hy_v3", "mimo2", "nemotron_h", "nemotron_h_moe", "qwen35", "qwen35moe", "qwen3next", "step35",
})

# Hybrids whose attention layers come every n-th layer, 4 when the file does not say (llama.cpp's
# models/qwen3next.cpp, qwen35.cpp, qwen35moe.cpp, qwen4exp.cpp, minimax-01.cpp)
_INTERVAL_HYBRIDS = {"qwen3next", "qwen35", "qwen35moe", "qwen4exp", "minimax-01"}


def _recurrent_layers(arch: str, n_layer: int, meta: Mapping[str, Any], n_head_kv: tuple[int, ...]) -> tuple[int, ...]:
    """Layers that keep a recurrent state instead of a KV cache (hybrid and recurrent models)."""
    listed = meta.get(f"{arch}.attention.recurrent_layers")
    if isinstance(listed, (list, tuple)) and len(listed) >= n_layer:  # one flag per layer
        return tuple(il for il in range(n_layer) if listed[il])
    interval = meta.get(f"{arch}.full_attention_interval")
    if not (isinstance(interval, int) and interval > 0) and arch in _INTERVAL_HYBRIDS:
        interval = 4
    if isinstance(interval, int) and interval > 0:  # qwen3next-style: every n-th layer attends
        nextn = int(meta.get(f"{arch}.nextn_predict_layers", 0) or 0)  # MTP layers at the end attend
        trunk = n_layer - nextn if 0 < nextn < n_layer else n_layer
        return tuple(il for il in range(trunk) if (il + 1) % interval != 0)
    if any(f"{arch}.ssm.{k}" in meta for k in ("state_size", "inner_size", "conv_kernel")):
        if arch in ("mamba", "mamba2", "rwkv6", "rwkv7"):
            return tuple(range(n_layer))
        # hybrids mark recurrent layers with head_count_kv == 0
        return tuple(il for il in range(n_layer) if n_head_kv[il] == 0)
    return ()
