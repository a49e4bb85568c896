"""ctypes glue with libllama and libggml: what llama-cpp-python's bindings leave out.

llama-cpp-python declares ``llama_model_params.tensor_buft_overrides`` and ``.devices`` but never
fills them, and does not bind ggml's device registry at all. This module declares the few ggml
prototypes moelocal needs, builds the NULL-terminated arrays llama.cpp reads (keeping them alive as
long as the model), and captures llama.cpp's log so the engine can read its buffer report.
Nothing here knows about plans or commands.
"""

from __future__ import annotations

import ctypes
import re
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache

from moelocal.errors import EngineError
from moelocal.plan import Placement, RunOptions

# enum ggml_backend_dev_type
DEV_CPU, DEV_GPU, DEV_IGPU, DEV_ACCEL, DEV_META = range(5)
_DEV_KIND = {DEV_CPU: "cpu", DEV_GPU: "gpu", DEV_IGPU: "igpu", DEV_ACCEL: "accel", DEV_META: "meta"}
# enum ggml_log_level
LOG_DEBUG, LOG_INFO, LOG_WARN, LOG_ERROR, LOG_CONT = 1, 2, 3, 4, 5
# enum ggml_type, for the KV cache
GGML_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "iq4_nl": 20, "bf16": 30}
MiB = 1 << 20


def llama():
    """The llama_cpp module (bindings to libllama), imported on first use: it loads the shared libraries."""
    import llama_cpp

    return llama_cpp


class _Feature(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("value", ctypes.c_char_p)]


_PROTOS: dict[str, tuple[list, object]] = {
    "ggml_backend_dev_count": ([], ctypes.c_size_t),
    "ggml_backend_dev_get": ([ctypes.c_size_t], ctypes.c_void_p),
    "ggml_backend_dev_by_type": ([ctypes.c_int], ctypes.c_void_p),
    "ggml_backend_dev_name": ([ctypes.c_void_p], ctypes.c_char_p),
    "ggml_backend_dev_description": ([ctypes.c_void_p], ctypes.c_char_p),
    "ggml_backend_dev_type": ([ctypes.c_void_p], ctypes.c_int),
    "ggml_backend_dev_memory": ([ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_size_t)],
                                None),
    "ggml_backend_dev_buffer_type": ([ctypes.c_void_p], ctypes.c_void_p),
    "ggml_backend_dev_host_buffer_type": ([ctypes.c_void_p], ctypes.c_void_p),
    "ggml_backend_dev_backend_reg": ([ctypes.c_void_p], ctypes.c_void_p),
    "ggml_backend_reg_name": ([ctypes.c_void_p], ctypes.c_char_p),
    "ggml_backend_reg_get_proc_address": ([ctypes.c_void_p, ctypes.c_char_p], ctypes.c_void_p),
    "ggml_backend_buft_name": ([ctypes.c_void_p], ctypes.c_char_p),
    "ggml_backend_cpu_buffer_type": ([], ctypes.c_void_p),
    "ggml_backend_reg_by_name": ([ctypes.c_char_p], ctypes.c_void_p),
    "ggml_backend_reg_dev_count": ([ctypes.c_void_p], ctypes.c_size_t),
    "ggml_backend_reg_dev_get": ([ctypes.c_void_p, ctypes.c_size_t], ctypes.c_void_p),
    "ggml_set_abort_callback": ([ctypes.c_void_p], ctypes.c_void_p),
}


@lru_cache(maxsize=1)
def _ggml() -> dict[str, ctypes._CFuncPtr]:
    """ggml's registry functions, declared here because llama-cpp-python does not bind them.

    They are looked up through libllama's own handle, which also searches the libraries it links
    (libggml, libggml-base): opening those files again by path could load a second copy with a
    registry of its own, which crashes.
    """
    lib = llama().llama_cpp._lib
    via = ctypes.CDLL(lib._name, handle=lib._handle)
    out = {}
    for name, (args, res) in _PROTOS.items():
        try:
            fn = getattr(via, name)
        except AttributeError:
            raise EngineError(
                f"llama-cpp-python's libraries do not export {name}", "reinstall llama-cpp-python >= 0.3.36"
            ) from None
        fn.argtypes = args
        fn.restype = res
        out[name] = fn
    return out


def _fn(name: str):
    return _ggml()[name]


# ---- devices ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Device:
    """One ggml backend device as its registry lists it."""

    index: int
    name: str  # CPU, CUDA0, RPC0 ...
    description: str
    kind: str  # cpu | gpu | igpu | accel
    backend: str  # the registry's name: CPU, CUDA, RPC, Metal ...
    free: int
    total: int
    handle: int = field(repr=False, compare=False)
    buffer_type: str = ""  # the name its buffers report (CUDA0, RPC0[127.0.0.1:50052] ...)


def devices() -> list[Device]:
    """Every device ggml has registered (CPU, GPUs, RPC servers added so far)."""
    out = []
    for i in range(_fn("ggml_backend_dev_count")()):
        h = _fn("ggml_backend_dev_get")(i)
        reg = _fn("ggml_backend_dev_backend_reg")(h)
        backend = _s(_fn("ggml_backend_reg_name")(reg)) if reg else ""
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        buft_name = ""
        if backend != "RPC":  # asking an RPC device opens a connection (and aborts if its worker is gone)
            _fn("ggml_backend_dev_memory")(h, ctypes.byref(free), ctypes.byref(total))
            buft = _fn("ggml_backend_dev_buffer_type")(h)
            buft_name = _s(_fn("ggml_backend_buft_name")(buft)) if buft else ""
        out.append(
            Device(
                index=i,
                name=_s(_fn("ggml_backend_dev_name")(h)),
                description=_s(_fn("ggml_backend_dev_description")(h)),
                kind=_DEV_KIND.get(_fn("ggml_backend_dev_type")(h), "other"),
                backend=backend,
                free=free.value,
                total=total.value,
                handle=h,
                buffer_type=buft_name,
            )
        )
    return out


def gpu_devices() -> list[Device]:
    """The devices a plan calls gpu0, gpu1, ...: ggml's local GPU-type devices in registry order
    (RPC devices also call themselves GPUs; a plan names those rpc0, rpc1, ...)."""
    return [d for d in devices() if d.kind == "gpu" and d.backend != "RPC"]


def device_handle(name: str, named: Mapping[str, int] | None = None) -> int:
    """The ggml device for a plan device name: 'cpu', 'gpuN' (the Nth GPU in the registry), or one
    of ``named`` (the workers' devices, 'rpcN', as :func:`rpc_add_server` connected them)."""
    if named and name in named:
        return named[name]
    if name == "cpu":
        h = _fn("ggml_backend_dev_by_type")(DEV_CPU)
        if not h:
            raise EngineError("llama.cpp has no CPU backend", "reinstall llama-cpp-python")
        return h
    if re.fullmatch(r"rpc\d+", name):
        have = len([n for n in (named or {}) if n.startswith("rpc")])
        raise EngineError(f"the plan puts tensors on {name}, but {have} worker device(s) are connected",
                          "give the same --worker HOST:PORT options the plan was made with")
    m = re.fullmatch(r"gpu(\d+)", name)
    if not m:
        raise EngineError(f"unknown device {name!r} in the plan", "devices are named cpu, gpu0, gpu1, rpc0 ...")
    gpus = gpu_devices()
    i = int(m.group(1))
    if i >= len(gpus):
        have = ", ".join(d.name for d in gpus) or "none"
        raise EngineError(
            f"the plan puts tensors on {name}, but llama.cpp sees {len(gpus)} GPU(s) ({have})",
            "this llama-cpp-python may be a CPU-only build; plan with --no-gpu or reinstall it with GPU support",
        )
    return gpus[i].handle


def buffer_type(name: str, named: Mapping[str, int] | None = None) -> int:
    """The buffer type of a plan device: the CPU's plain buffer type, or a device's own buffer type."""
    if name == "cpu":
        # llama.cpp compares override targets with this very pointer to decide "host memory"
        return _fn("ggml_backend_cpu_buffer_type")()
    return _fn("ggml_backend_dev_buffer_type")(device_handle(name, named))


def buffer_type_devices() -> dict[str, str]:
    """Buffer type name → plan device ('cpu' or 'gpuN'), for reading llama.cpp's buffer report."""
    out: dict[str, str] = {}
    for i, d in enumerate(gpu_devices()):
        out[d.buffer_type] = f"gpu{i}"
        host = _fn("ggml_backend_dev_host_buffer_type")(d.handle)
        if host:
            out[_s(_fn("ggml_backend_buft_name")(host))] = "cpu"  # pinned host memory is RAM
    return out


def cpu_extra_buffer_types() -> list[str]:
    """Names of the CPU backend's extra buffer types (AMX, CPU_REPACK, KleidiAI ...), as loaded now."""
    dev = _fn("ggml_backend_dev_by_type")(DEV_CPU)
    reg = _fn("ggml_backend_dev_backend_reg")(dev)
    addr = _fn("ggml_backend_reg_get_proc_address")(reg, b"ggml_backend_dev_get_extra_bufts")
    if not addr:
        return []
    get = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)(addr)
    arr = get(dev)
    names = []
    i = 0
    while arr and arr[i]:
        names.append(_s(_fn("ggml_backend_buft_name")(arr[i])))
        i += 1
    return names


def cpu_features() -> dict[str, str]:
    """What the CPU backend was built with and finds on this CPU (AVX2, AMX_INT8, REPACK ...)."""
    dev = _fn("ggml_backend_dev_by_type")(DEV_CPU)
    reg = _fn("ggml_backend_dev_backend_reg")(dev)
    addr = _fn("ggml_backend_reg_get_proc_address")(reg, b"ggml_backend_get_features")
    if not addr:
        return {}
    get = ctypes.CFUNCTYPE(ctypes.POINTER(_Feature), ctypes.c_void_p)(addr)
    arr = get(reg)
    out = {}
    i = 0
    while arr and arr[i].name:
        out[_s(arr[i].name)] = _s(arr[i].value)
        i += 1
    return out


def _s(b: bytes | None) -> str:
    return b.decode("utf-8", "replace") if b else ""


# ---- RPC: llama.cpp's backend for devices on other machines ---------------------------------

_START_SERVER = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t,
                                 ctypes.POINTER(ctypes.c_void_p))
_ADD_SERVER = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p)
_ABORT_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_char_p)


def _rpc_proc(name: str) -> int:
    reg = _fn("ggml_backend_reg_by_name")(b"RPC")
    if not reg:
        raise EngineError("this llama-cpp-python was built without llama.cpp's RPC backend",
                          "reinstall it with CMAKE_ARGS=-DGGML_RPC=on")
    addr = _fn("ggml_backend_reg_get_proc_address")(reg, name.encode())
    if not addr:
        raise EngineError(f"llama.cpp's RPC backend does not export {name}", "reinstall llama-cpp-python >= 0.3.36")
    return addr


def rpc_start_server(endpoint: str, device_handles: Sequence[int], threads: int) -> None:
    """Serve ``device_handles`` to RPC clients at ``endpoint`` (an IPv4 address:port). Blocks for as
    long as the server runs; returns only if it could not start (llama.cpp says why on stderr)."""
    start = _START_SERVER(_rpc_proc("ggml_backend_rpc_start_server"))
    devs = (ctypes.c_void_p * len(device_handles))(*device_handles)
    start(endpoint.encode(), None, max(1, threads), len(device_handles), devs)


_RPC_SERVERS: dict[str, list[int]] = {}


def rpc_add_server(endpoint: str) -> list[int]:
    """The devices a worker serves, as ggml devices (in the worker's order), connecting on first use.

    They are deliberately not added to ggml's registry: llama.cpp would then use them for any model
    loaded without an explicit device list, and every listing of the registry would talk to the
    worker (and abort the process if it is gone). Check the worker with rpc.probe first: llama.cpp
    aborts the process when it cannot connect.
    """
    if endpoint not in _RPC_SERVERS:
        reg = _ADD_SERVER(_rpc_proc("ggml_backend_rpc_add_server"))(endpoint.encode())
        if not reg:
            raise EngineError(f"the worker at {endpoint} serves no devices")
        n = _fn("ggml_backend_reg_dev_count")(reg)
        _RPC_SERVERS[endpoint] = [_fn("ggml_backend_reg_dev_get")(reg, i) for i in range(n)]
    return list(_RPC_SERVERS[endpoint])


def rpc_buffer_type_name(endpoint: str, device: int) -> str:
    """The name llama.cpp gives a worker device's buffers (ggml-rpc.cpp: "RPC<device>[<endpoint>]")."""
    return f"RPC{device}[{endpoint}]"


_ON_ABORT: list[object] = []  # the ctypes callback, alive as long as the process


def on_abort(handler: Callable[[str], None]) -> None:
    """Call ``handler(message)`` when ggml is about to abort the process (GGML_ABORT).

    ggml calls abort() right after the handler returns; a handler that wants a clean exit must end
    the process itself (os._exit). The last handler set wins.
    """

    def _cb(message: bytes | None) -> None:
        try:
            handler(_s(message))
        except BaseException:  # never unwind into C
            pass

    cb = _ABORT_CALLBACK(_cb)
    _fn("ggml_set_abort_callback")(ctypes.cast(cb, ctypes.c_void_p))
    _ON_ABORT[:] = [cb]  # only now may the previous one go: ggml no longer points to it


# ---- arrays llama.cpp reads during loading ---------------------------------------------------


class _BuftOverride(ctypes.Structure):
    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


class NativeArrays:
    """The C arrays a model's params point to, kept alive together for the life of the model.

    llama.cpp copies neither the override list nor its pattern strings while loading, so the
    Python objects that own them must outlive the call (and are simply kept with the model).
    """

    def __init__(
        self,
        overrides: Sequence[tuple[str, str]] = (),
        devices: Sequence[str] | None = None,
        tensor_split: Sequence[float] = (),
        named: Mapping[str, int] | None = None,
    ) -> None:
        self._keep: list[object] = []
        self.overrides = None
        self.devices = None
        self.tensor_split = None
        if overrides:
            for pattern, _ in overrides:
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise EngineError(f"tensor override pattern {pattern!r} is not a valid regex: {exc}") from None
            arr = (_BuftOverride * (len(overrides) + 1))()
            for i, (pattern, dev) in enumerate(overrides):
                raw = ctypes.create_string_buffer(pattern.encode())
                self._keep.append(raw)
                arr[i].pattern = ctypes.cast(raw, ctypes.c_char_p)
                arr[i].buft = buffer_type(dev, named)
            arr[len(overrides)].pattern = None  # the terminator llama.cpp stops at
            arr[len(overrides)].buft = None
            self._keep.append(arr)
            self.overrides = ctypes.cast(arr, ctypes.c_void_p)
        if devices is not None:
            devs = (ctypes.c_void_p * (len(devices) + 1))(*[device_handle(d, named) for d in devices], None)
            self._keep.append(devs)
            self.devices = ctypes.cast(devs, ctypes.c_void_p)
        if tensor_split:
            n = max(int(llama().llama_max_devices()), len(tensor_split))
            split = (ctypes.c_float * n)(*[float(x) for x in tensor_split])
            self._keep.append(split)
            self.tensor_split = ctypes.cast(split, ctypes.POINTER(ctypes.c_float))

    def apply(self, params) -> None:
        """Point a llama_model_params at these arrays."""
        if self.overrides is not None:
            params.tensor_buft_overrides = self.overrides
        if self.devices is not None:
            params.devices = self.devices
        if self.tensor_split is not None:
            params.tensor_split = self.tensor_split


# ---- llama.cpp's log -------------------------------------------------------------------------


class _LogSink:
    """Collects llama.cpp's log lines: the last few always, everything while a capture is open."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.recent: deque[tuple[int, str]] = deque(maxlen=400)
        self.captures: list[list[tuple[int, str]]] = []
        self.partial = ""
        self.level = LOG_INFO
        self.echo: Callable[[int, str], None] | None = None

    def write(self, level: int, text: str) -> None:
        with self.lock:
            if level != LOG_CONT:
                if self.partial:  # a message that never got its newline
                    self._line(self.level, self.partial)
                    self.partial = ""
                self.level = level
            self.partial += text
            while "\n" in self.partial:
                line, self.partial = self.partial.split("\n", 1)
                self._line(self.level, line)

    def _line(self, level: int, line: str) -> None:
        self.recent.append((level, line))
        for c in self.captures:
            c.append((level, line))
        if self.echo is not None:
            self.echo(level, line)


_SINK = _LogSink()
_CALLBACK = None  # the ctypes callback must live as long as the process: llama.cpp keeps the pointer


def install_log() -> None:
    """Route llama.cpp's log (and ggml's) into moelocal, once per process."""
    global _CALLBACK
    if _CALLBACK is not None:
        return
    lc = llama()

    @lc.llama_log_callback
    def _cb(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
        try:
            _SINK.write(int(level), text.decode("utf-8", "replace") if text else "")
        except Exception:  # an exception must never unwind into C
            pass

    _CALLBACK = _cb
    lc.llama_log_set(_cb, ctypes.c_void_p(0))


def set_log_echo(echo: Callable[[int, str], None] | None) -> None:
    """Also pass every log line to ``echo`` (``--verbose``); None stops it."""
    install_log()
    _SINK.echo = echo


@contextmanager
def capture_log() -> Iterator[list[tuple[int, str]]]:
    """Collect the (level, line) pairs llama.cpp logs inside the block."""
    install_log()
    lines: list[tuple[int, str]] = []
    with _SINK.lock:
        _SINK.captures.append(lines)
    try:
        yield lines
    finally:
        with _SINK.lock:
            if _SINK.partial:
                _SINK._line(_SINK.level, _SINK.partial)
                _SINK.partial = ""
            # by identity: two nested captures hold equal lists, and list.remove compares by value
            _SINK.captures[:] = [c for c in _SINK.captures if c is not lines]


def last_error(lines: Sequence[tuple[int, str]] | None = None) -> str:
    """The last error line llama.cpp logged (in ``lines``, else recently), stripped of its prefix."""
    pool = list(lines) if lines is not None else list(_SINK.recent)
    for level, line in reversed(pool):
        if level == LOG_ERROR and line.strip():
            text = line.strip()
            # "llama_model_load: error loading model: X" -> "X"
            return re.sub(r"^(\w+: )+(error loading model: )?", "", text) or text
    return ""


# ---- the buffer report -----------------------------------------------------------------------

_OVERRIDE_RE = re.compile(r"^tensor (\S+) \((\d+) MiB (\w+)\) buffer type overridden to (\S+)")
_BUFFER_RE = re.compile(
    r"^\w+: +(\S+) +(model|KV|RS|compute|output|DSV4 \w+ state) buffer size = +([0-9.]+) MiB"
)


@dataclass(frozen=True)
class Buffer:
    """One buffer llama.cpp allocated, as its log reports it."""

    name: str  # the buffer type: CPU, CPU_Mapped, CPU_REPACK, CUDA0, CUDA_Host ...
    kind: str  # model | kv | rs | compute | output
    bytes: int


@dataclass(frozen=True)
class BufferReport:
    """What llama.cpp says it placed: every buffer, and every tensor an override moved."""

    buffers: tuple[Buffer, ...] = ()
    overridden: tuple[tuple[str, str], ...] = ()  # (tensor name, buffer type)

    def by_kind(self, kind: str) -> dict[str, int]:
        out: dict[str, int] = {}
        for b in self.buffers:
            if b.kind == kind:
                out[b.name] = out.get(b.name, 0) + b.bytes
        return out


def model_params(placement: Placement, *, extra_bufts: bool, named: Mapping[str, int] | None = None):
    """(llama_model_params, the arrays they point into) for a placement: the one place the engine and
    measure.py build them. Keep the arrays alive as long as the model."""
    lc = llama()
    on_gpu = bool(placement.devices) and placement.n_gpu_layers > 0
    # An explicit device list even for CPU plans: an empty one keeps llama.cpp from picking up
    # GPUs (or RPC servers) the plan does not use.
    arrays = NativeArrays(
        overrides=placement.tensor_overrides,
        devices=list(placement.devices) if on_gpu else [],
        tensor_split=placement.tensor_split if on_gpu and len(placement.devices) > 1 else (),
        named=named,
    )
    mp = lc.llama_model_default_params()
    mp.n_gpu_layers = placement.n_gpu_layers if on_gpu else 0
    mp.use_extra_bufts = extra_bufts
    if not placement.from_disk and ((on_gpu and placement.tensor_overrides) or (not on_gpu and extra_bufts)):
        # With a GPU, llama.cpp's advice for host-resident experts: read them into pinned RAM.
        # On the CPU, repacked weights are copies: without mmap each weight is held once, as the
        # plan counts it (with mmap the file's pages would be reported on top).
        mp.load_mode = lc.LLAMA_LOAD_MODE_NONE
    arrays.apply(mp)
    return mp, arrays


def context_params(options: RunOptions, n_threads: int):
    """The llama_context_params for these options: the one place the engine and measure.py get them."""
    lc = llama()
    cp = lc.llama_context_default_params()
    cp.n_ctx = options.n_ctx
    cp.n_batch = max(options.n_batch, options.n_ubatch)
    cp.n_ubatch = options.n_ubatch
    cp.n_seq_max = max(1, options.n_seq)
    cp.n_threads = cp.n_threads_batch = n_threads
    cp.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_ENABLED if options.flash_attn else lc.LLAMA_FLASH_ATTN_TYPE_DISABLED
    cp.type_k = cp.type_v = GGML_TYPES[options.kv_type]
    cp.no_perf = True
    cp.swa_full = options.swa_full
    # one KV stream per sequence (not unified): a sequence's attention never sees the cells of the
    # others, so each answer is the same whatever ran beside it (on the CPU at least)
    cp.kv_unified = False
    return cp


def parse_buffer_report(lines: Sequence[tuple[int, str]] | Sequence[str]) -> BufferReport:
    """Read llama.cpp's load and context log for its buffer sizes and overridden tensors."""
    buffers: list[Buffer] = []
    overridden: list[tuple[str, str]] = []
    for item in lines:
        line = item[1] if isinstance(item, tuple) else item
        m = _OVERRIDE_RE.match(line)
        if m:
            overridden.append((m.group(1), m.group(4)))
            continue
        m = _BUFFER_RE.match(line)
        if m:
            kind = m.group(2)
            kind = "rs" if kind.startswith("DSV4") else kind.lower()
            buffers.append(Buffer(m.group(1), kind, round(float(m.group(3)) * MiB)))
    return BufferReport(tuple(buffers), tuple(overridden))


def buffer_device(name: str, known: dict[str, str] | None = None) -> str:
    """Which plan device a buffer type lives on: 'cpu' for host memory, 'gpuN' from ``known``
    (see buffer_type_devices), else the buffer type's own name."""
    if known and name in known:
        return known[name]
    if name.startswith("CPU") or name == "AMX" or name.endswith("_Host"):
        return "cpu"
    return name
