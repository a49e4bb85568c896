"""Exact memory figures from llama.cpp itself: the companion of memory.py's estimate.

``measure()`` loads a model the way a plan says (same llama.cpp parameters as the engine) in
llama.cpp's ``no_alloc`` mode: the loader reads the header, places every tensor, sizes the KV cache
and reserves the worst-case compute graph, but allocates nothing and reads no tensor data. It takes
a fraction of a second even for a 60 GB model, and works on a *sparse* file: a GGUF header followed
by a hole up to the file's full size (``write_sparse``), which is all a Hub model needs.

The figures come from ``llama_get_memory_breakdown`` (exact bytes per buffer type: model, context,
compute), the same API llama.cpp's own ``--fit`` uses. It is a C++ function returning a
``std::map``; we read the map in place (libstdc++ layout, checked before use). Where that is not
possible (another C++ runtime, or an older llama.cpp) the model is loaded for real and llama.cpp's
log is read instead (its buffer report, to 0.01 MiB). The output buffer is never in the breakdown
and always comes from the log.

Notes for this llama.cpp (llama-cpp-python 0.3.36):
- ``no_alloc`` needs ``load_mode = NONE``: with mmap the loader asserts (llama-model.cpp:1855).
- In ``no_alloc`` mode the model's weights are the tensor sizes (padded to the buffer alignment),
  not the mmap range a real CPU_Mapped buffer reports; memory.py estimates the former.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path

from moelocal.errors import EngineError
from moelocal.plan import CPU, DeviceMemory, Placement, RunOptions

# llama.h: enum ggml_type values for the KV cache types
_BREAKDOWN_SYMBOL = "_Z26llama_get_memory_breakdownPK13llama_context"


def measure(
    path: str | os.PathLike[str],
    placement: Placement | None = None,
    options: RunOptions | None = None,
    *,
    allocate: bool = False,
    extra_bufts: bool = False,
    named: Mapping[str, int] | None = None,
    log: list | None = None,
) -> dict[str, DeviceMemory]:
    """Bytes per device ("cpu", "gpu0", ...) llama.cpp needs for ``path`` placed as ``placement``.

    ``allocate=False`` (the default) uses no_alloc: nothing is allocated and no weights are read.
    ``allocate=True`` loads for real (mmap), as the engine does; weights on the CPU are then the
    mapped range of the file. ``extra_bufts`` lets llama.cpp repack CPU weights (off by default:
    see engine.extra_bufts_default: the AMX trap). ``named`` maps plan device names to ggml devices that are
    not in the registry (RPC workers' ``rpc0``, ... from native.rpc_add_server). ``log``, if given,
    receives llama.cpp's (level, line) log of the load.
    """
    from moelocal import native

    placement = placement or Placement()
    options = options or RunOptions()
    label = Path(path).name
    lc = native.llama()
    native.install_log()
    lc.llama_backend_init()
    breakdown_ok = _breakdown_fn() is not None
    no_alloc = not allocate and breakdown_ok
    mp, arrays = native.model_params(placement, extra_bufts=extra_bufts, named=named)
    mp.no_alloc = no_alloc
    if no_alloc:
        mp.load_mode = lc.LLAMA_LOAD_MODE_NONE  # no_alloc asserts with mmap
    model = ctx = None
    with native.capture_log() as lines:
        try:
            model = lc.llama_model_load_from_file(os.fsencode(os.fspath(path)), mp)
            if not model:
                raise EngineError(f"llama.cpp could not load {label}: {load_error(lines)}")
            ctx = lc.llama_init_from_model(model, native.context_params(options, n_threads=1))  # nothing is computed
            if not ctx:
                why = native.last_error(lines) or "see its log"
                raise EngineError(f"llama.cpp could not make a context for {label}: {why}")
            by_buft = _breakdown(ctx) if breakdown_ok else None
        finally:
            if ctx:
                lc.llama_free(ctx)
            if model:
                lc.llama_model_free(model)
    if by_buft is None and no_alloc:  # the map did not look as expected: read a real load's log instead
        return measure(path, placement, options, allocate=True, extra_bufts=extra_bufts, named=named, log=log)
    if log is not None:
        log.extend(lines)
    report = native.parse_buffer_report(lines)
    devices = native.buffer_type_devices()
    for dev, handle in (named or {}).items():
        buft = native._fn("ggml_backend_dev_buffer_type")(handle)
        devices[native._s(native._fn("ggml_backend_buft_name")(buft))] = dev
    acc: dict[str, dict[str, int]] = {}

    def add(buft: str, field: str, n: int) -> None:
        slot = acc.setdefault(native.buffer_device(buft, devices), {})
        slot[field] = slot.get(field, 0) + n

    for buft, n in report.by_kind("output").items():
        add(buft, "output", n)
    if by_buft is not None:
        for buft, (model_b, context_b, compute_b) in by_buft.items():
            add(buft, "weights", model_b)
            add(buft, "kv", context_b)
            add(buft, "compute", compute_b)
    else:
        for kind, field in (("model", "weights"), ("kv", "kv"), ("rs", "kv"), ("compute", "compute")):
            for buft, n in report.by_kind(kind).items():
                add(buft, field, n)
    out = {dev: DeviceMemory(**v) for dev, v in acc.items()}
    out.setdefault(CPU, DeviceMemory())
    return out


def load_error(lines) -> str:
    """Why llama.cpp's loader gave up, from its log: the "error loading model: X" line (its last
    error line is only "failed to load model")."""
    from moelocal import native

    for _level, line in lines:
        if "error loading model: " in line:
            return line.split("error loading model: ", 1)[1].strip() or "see its log"
    return native.last_error(lines) or "see its log"


def write_sparse(prefix: bytes, size: int, dest: str | os.PathLike[str]) -> Path:
    """A stand-in for a GGUF file of ``size`` bytes of which only ``prefix`` (its header) is known:
    the prefix, then a hole up to the full size. Enough for ``measure`` (no_alloc reads no data)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "wb") as fh:
        fh.write(prefix)
        fh.truncate(max(size, len(prefix)))
    return dest


# ---- llama_get_memory_breakdown ----------------------------------------------------------------
#
# llama-ext.h: std::map<ggml_backend_buffer_type_t, llama_memory_breakdown_data>, returned by value
# (through a hidden pointer, Itanium C++ ABI). libstdc++'s map is a red-black tree: the map object
# holds the (empty) comparator, a header node {color, parent=root, leftmost, rightmost} and the node
# count; each node is {color, parent, left, right} followed by the pair {key, {model, context, compute}}.


class _Node(ctypes.Structure):
    pass


_Node._fields_ = [
    ("color", ctypes.c_int),
    ("parent", ctypes.POINTER(_Node)),
    ("left", ctypes.POINTER(_Node)),
    ("right", ctypes.POINTER(_Node)),
    ("buft", ctypes.c_void_p),
    ("model", ctypes.c_size_t),
    ("context", ctypes.c_size_t),
    ("compute", ctypes.c_size_t),
]


class _Map(ctypes.Structure):
    _fields_ = [
        ("compare", ctypes.c_size_t),
        ("color", ctypes.c_int),
        ("root", ctypes.POINTER(_Node)),
        ("leftmost", ctypes.POINTER(_Node)),
        ("rightmost", ctypes.POINTER(_Node)),
        ("count", ctypes.c_size_t),
        ("_spare", ctypes.c_size_t * 4),  # room in case the real object is larger than we think
    ]


@lru_cache(maxsize=1)
def _breakdown_fn():
    """The breakdown function where its map can be read (Linux, libstdc++), else None."""
    if not sys.platform.startswith("linux"):
        return None  # libc++ (macOS) and MSVC lay std::map out differently
    from moelocal import native

    lib = native.llama().llama_cpp._lib
    via = ctypes.CDLL(lib._name, handle=lib._handle)
    try:
        fn = getattr(via, _BREAKDOWN_SYMBOL)
        name = via.ggml_backend_buft_name
    except AttributeError:
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    fn.restype = ctypes.c_void_p
    name.argtypes = [ctypes.c_void_p]
    name.restype = ctypes.c_char_p
    return fn, name


def _known_bufts() -> set[int]:
    """Every buffer type llama.cpp can use here, to check the map's keys before dereferencing them."""
    from moelocal import native

    f = native._fn
    out = {f("ggml_backend_cpu_buffer_type")()}
    handles = [d.handle for d in native.devices()] + [h for hs in native._RPC_SERVERS.values() for h in hs]
    for h in handles:
        for get in ("ggml_backend_dev_buffer_type", "ggml_backend_dev_host_buffer_type"):
            b = f(get)(h)
            if b:
                out.add(b)
    dev = f("ggml_backend_dev_by_type")(native.DEV_CPU)
    reg = f("ggml_backend_dev_backend_reg")(dev)
    addr = f("ggml_backend_reg_get_proc_address")(reg, b"ggml_backend_dev_get_extra_bufts")
    if addr:
        arr = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)(addr)(dev)
        i = 0
        while arr and arr[i]:
            out.add(arr[i])
            i += 1
    return out


def _breakdown(ctx) -> dict[str, tuple[int, int, int]] | None:
    """{buffer type name: (model, context, compute) bytes}, or None if the map does not look right.

    The map's nodes are left allocated (a few hundred bytes per call): freeing memory that C++'s
    allocator owns from Python is not worth the risk.
    """
    fn, name = _breakdown_fn()
    m = _Map()
    fn(ctypes.byref(m), ctx)
    if not 0 < m.count <= 64 or not m.root:
        return None
    known = _known_bufts()
    out: dict[str, tuple[int, int, int]] = {}
    stack, seen = [m.root], 0
    while stack:  # the tree has m.count nodes; anything else means the layout is not what we think
        p = stack.pop()
        if not p:
            continue
        seen += 1
        if seen > m.count:
            return None
        node = p.contents
        if node.buft not in known:
            return None
        out[name(node.buft).decode()] = (node.model, node.context, node.compute)
        stack += [node.left, node.right]
    return out if seen == m.count else None

