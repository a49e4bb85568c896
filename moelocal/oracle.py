"""llama.cpp as the oracle for memory: its own dry run of a model, asked once and remembered.

moelocal's memory model (memory.py) rebuilds llama.cpp's graph node for node for the architectures
it knows (memory.compute_is_exact); llama.cpp loads some seventy MoE architectures. Rather than
trust a rebuild where it is not proven, ``fit`` and the run commands ask llama.cpp itself: a
``no_alloc`` load of the model (measure.py) — the local file, or a Hub model's header written
before a hole of its size — gives the KV cache and recurrent state, the compute buffer and the
logits buffer at the plan's context, ubatch, batch, KV type, flash attention and sequence count,
for the whole model on the CPU. memory.estimate bills those (:class:`memory.Reference`) and splits
them over devices by its own model. The same load is the check that llama.cpp can run the model at
all: an architecture it does not know, a missing or misshapen tensor, a vocabulary it rejects end
``fit`` with one line (:class:`ModelFileError`, exit code 2) before anything is downloaded.

Answers are cached on disk (``config.cache_dir("oracle")``) by the bytes of the header(s), the
options and the llama-cpp-python version, so a second ``fit`` costs nothing. Where this process has
not loaded llama.cpp, a child process answers (``python -m moelocal.oracle``): ``fit`` itself never
pays for loading llama.cpp, and a llama.cpp abort (a GGML_ASSERT) cannot take it down.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict
from functools import lru_cache
from pathlib import Path

from moelocal import config, memory
from moelocal.errors import ModelFileError
from moelocal.gguf_model import ModelSummary
from moelocal.plan import RunOptions

# bump when what is cached changes meaning
_CACHE_VERSION = 2


@lru_cache(maxsize=1)
def llama_cpp_version() -> str:
    """The version of llama-cpp-python (whose vendored llama.cpp moelocal runs), without importing it."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llama-cpp-python")
    except PackageNotFoundError:
        return "unknown"


class Unloadable(ModelFileError):
    """llama.cpp cannot load (or cannot plan) this model: no plan is worth showing."""


# ---- cache keys ------------------------------------------------------------------------------

_DIGESTS: dict[int, tuple[ModelSummary, str]] = {}


def header_digest(summary: ModelSummary) -> str | None:
    """A hash of the model's header bytes (every shard), or None where they are not at hand."""
    hit = _DIGESTS.get(id(summary))
    if hit is not None and hit[0] is summary:
        return hit[1]
    if not summary.sources:
        return None
    h = hashlib.blake2b(digest_size=20)
    for src in summary.sources:
        if src.raw is not None:
            h.update(src.raw)
        else:
            try:
                with open(src.path, "rb") as fh:
                    h.update(fh.read(src.header_size))
            except OSError:
                return None
        h.update(str(src.size).encode())
    digest = h.hexdigest()
    if len(_DIGESTS) > 64:
        _DIGESTS.clear()
    _DIGESTS[id(summary)] = (summary, digest)
    return digest


def _key(digest: str, options: RunOptions) -> str:
    opts = asdict(options)
    opts.pop("n_threads", None)  # threads change nothing llama.cpp allocates
    text = json.dumps([_CACHE_VERSION, llama_cpp_version(), digest, opts], sort_keys=True)
    return hashlib.blake2b(text.encode(), digest_size=20).hexdigest()


def _cache_path(key: str) -> Path:
    return config.cache_dir("oracle") / f"{key}.json"


def _cached(key: str) -> dict | None:
    try:
        return json.loads(_cache_path(key).read_text())
    except (OSError, ValueError):
        return None


def _store(key: str, answer: dict) -> None:
    path = _cache_path(key)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(answer))
        os.replace(tmp, path)
    except OSError:
        pass  # a cache that cannot be written only costs time


# ---- asking llama.cpp ------------------------------------------------------------------------


def prefetch(jobs: Sequence[tuple[ModelSummary, RunOptions]]) -> None:
    """Ask llama.cpp about every (model, options) not in the cache, in one go (one child process)."""
    todo: list[tuple[str, ModelSummary, RunOptions]] = []
    seen = set()
    for summary, options in jobs:
        digest = header_digest(summary)
        if digest is None:
            continue
        key = _key(digest, options)
        if key in seen or _cached(key) is not None:
            continue
        seen.add(key)
        todo.append((key, summary, options))
    if not todo:
        return
    with tempfile.TemporaryDirectory(prefix="moelocal-oracle-") as tmp:
        work = [(key, str(_model_file(summary, Path(tmp) / str(i))), options)
                for i, (key, summary, options) in enumerate(todo)]
        for key, answer in _run(work):
            if answer is not None:
                _store(key, answer)


def reference(summary: ModelSummary, options: RunOptions) -> memory.Reference | None:
    """llama.cpp's CPU-only figures for ``summary`` at ``options`` (cached), or None where its
    header is not at hand (a summary built in memory) or llama.cpp cannot be asked here.

    Raises :class:`Unloadable` when llama.cpp cannot load the model or make a context for it."""
    digest = header_digest(summary)
    if digest is None:
        return None
    key = _key(digest, options)
    answer = _cached(key)
    if answer is None:
        prefetch([(summary, options)])
        answer = _cached(key)
    if answer is None:
        return None
    if "error" in answer:
        raise Unloadable(_unloadable_message(summary, answer), _hint(answer))
    return memory.Reference(**{k: int(answer[k]) for k in ("weights", "kv", "compute", "output")},
                            kv_layers=tuple(answer.get("kv_layers") or ()))


def for_summary(summary: ModelSummary) -> Callable[[RunOptions], memory.Reference | None]:
    """The planner's oracle for one model (planner.Oracle)."""
    return lambda options: reference(summary, options)


def _unloadable_message(summary: ModelSummary, answer: dict) -> str:
    what = "cannot load" if answer.get("stage") == "load" else "cannot run"
    label = Path(summary.files[0]).name if summary.files else summary.name
    # "check_tensor_dims: tensor 'x' has wrong shape; expected    256,    256" -> "tensor 'x' ... 256, 256"
    why = re.sub(r"\s+", " ", re.sub(r"^(\w+: )+(?=\w+ )", "", answer["error"].strip()))
    return (f"llama.cpp (llama-cpp-python {llama_cpp_version()}) {what} {label} "
            f"(architecture {summary.architecture}): {why}")


def _hint(answer: dict) -> str:
    if "requires ctx_other" in answer.get("error", ""):  # llama.cpp's speculative-decoding draft heads (dflash)
        return "this is a draft head for speculative decoding: llama.cpp runs it only beside its target model"
    if answer.get("stage") != "load":
        return "check the options (--ctx, --ubatch, --kv-type; a quantized V cache needs flash attention)"
    if "unknown model architecture" in answer["error"]:
        return "moelocal plans only what its llama.cpp can run; a newer llama-cpp-python may know it"
    return "the file may be damaged or made for another llama.cpp; download it again or ask its publisher"


def describe(summary: ModelSummary, options: RunOptions, ref: memory.Reference | None) -> dict:
    """Where fit's memory figures come from, for people (``text``) and for --json (``source``)."""
    exact = memory.compute_is_exact(summary)
    arch = summary.architecture
    out = {"llama_cpp": llama_cpp_version()}
    if ref is None:
        why = "exact for this architecture" if exact else f"approximate: {arch} is not rebuilt by moelocal"
        return {**out, "source": "moelocal", "text": f"moelocal's model ({why}; llama.cpp's dry run not available)"}
    own_kv = sum(memory.kv_bytes_by_layer(summary, options))
    agree = own_kv == ref.kv and memory.compute_bytes(summary, options) == ref.compute
    if agree:
        return {**out, "source": "moelocal", "text": "moelocal's model (exact for this architecture: "
                "llama.cpp's dry run agrees)"}
    why = f"{arch} not rebuilt by moelocal" if not exact else f"moelocal's rebuild of {arch} is off for this model"
    return {**out, "source": "llama.cpp", "text": f"llama.cpp dry run ({why})"}


def _model_file(summary: ModelSummary, tmp: Path) -> Path:
    """A file llama.cpp can load for ``summary``: the model itself, or its header(s) before holes."""
    from moelocal.measure import write_sparse

    first = summary.sources[0]
    if first.path is not None and all(s.path is not None for s in summary.sources):
        return Path(first.path)
    out = None
    for name, src in zip(summary.files, summary.sources, strict=True):
        dest = tmp / Path(name).name  # shards keep their names: llama.cpp finds the others by them
        if src.raw is not None:
            write_sparse(src.raw, src.size, dest)
        else:
            os.symlink(src.path, dest)
        out = out or dest
    return out


def _run(work: list[tuple[str, str, RunOptions]], child: bool | None = None) -> list[tuple[str, dict | None]]:
    """Answers for (key, model file, options): here if llama.cpp is loaded already, else (or with
    ``child``) in a child process, restarted after a llama.cpp abort with the jobs left."""
    if child is None:
        child = "llama_cpp" not in sys.modules
    if not child:
        return [(key, _dry_run(path, options)) for key, path, options in work]
    out: list[tuple[str, dict | None]] = []
    while work:
        job = json.dumps([[key, path, asdict(options)] for key, path, options in work])
        proc = subprocess.run([sys.executable, "-m", "moelocal.oracle"], input=job, capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": _pythonpath(), "GGML_NO_BACKTRACE": "1"})
        answers = {}
        for line in proc.stdout.splitlines():
            if line.startswith("{"):
                try:
                    d = json.loads(line)
                    answers[d["key"]] = d["answer"]
                except (ValueError, KeyError):
                    pass
        done = [w for w in work if w[0] in answers]
        out += [(w[0], answers[w[0]]) for w in done]
        rest = [w for w in work if w[0] not in answers]
        if not rest:
            break
        if proc.returncode == 0 or not (proc.returncode < 0 or _crashed(proc.stderr)):
            out += [(w[0], None) for w in rest]  # llama.cpp could not be asked here: fall back to the model
            break
        # the first job without an answer took the process down: that is its answer; go on with the rest
        out.append((rest[0][0], {"error": _abort_line(proc.stderr, proc.returncode), "stage": "load"}))
        work = rest[1:]
    return out


def _pythonpath() -> str:
    """This moelocal first on the child's path, whatever the current directory."""
    here = str(Path(__file__).resolve().parent.parent)
    rest = os.environ.get("PYTHONPATH", "")
    return here + (os.pathsep + rest if rest else "")


def _crashed(stderr: str) -> bool:
    return "GGML_ASSERT" in stderr or "GGML_ABORT" in stderr or "terminate called" in stderr or \
        "Aborted" in stderr or "Segmentation" in stderr


def _abort_line(stderr: str, returncode: int = 0) -> str:
    for line in stderr.splitlines():
        if "GGML_ASSERT" in line or "error:" in line or "terminate called" in line:
            return "llama.cpp aborts on it: " + line.strip().rsplit("/", 1)[-1][:300]
    return "llama.cpp crashes on it" + (f" (signal {-returncode})" if returncode < 0 else "")


def _dry_run(path: str, options: RunOptions) -> dict:
    """One no_alloc load, whole model on the CPU: the answer to cache (figures, or the error)."""
    from moelocal.errors import EngineError
    from moelocal.measure import measure

    lines: list[tuple[int, str]] = []
    try:
        mem = measure(path, None, options, log=lines)
    except EngineError as exc:
        text = exc.message
        stage = "context" if "could not make a context" in text else "load"
        reason = text.split(": ", 1)[1] if ": " in text else text
        return {"error": reason, "stage": stage}
    cpu = mem.get("cpu")
    others = {d: m for d, m in mem.items() if d != "cpu"}
    total = cpu
    for m in others.values():  # nothing should be elsewhere on a CPU-only load; count it if it is
        total = memory.DeviceMemory(weights=total.weights + m.weights, kv=total.kv + m.kv,
                                    compute=total.compute + m.compute, output=total.output + m.output)
    return {"weights": total.weights, "kv": total.kv, "compute": total.compute, "output": total.output,
            "kv_layers": kv_by_layer(lines, total.kv)}


_GQA = re.compile(r"print_info: n_embd_([kv])_gqa\s*=\s*(.+)$")
_KV_LAYER = re.compile(r"llama_kv_cache: layer +(\d+): dev = ")
_KV_SIZE = re.compile(r"llama_kv_cache: size = +([0-9.]+) MiB \( *(\d+) cells")
_RS_LAYER = re.compile(r"llama_memory_recurrent, layer +(\d+): dev = ")
_RS_SIZE = re.compile(r"llama_memory_recurrent: size = +([0-9.]+) MiB")


def kv_by_layer(lines: Sequence[tuple[int, str]], total: int) -> list[int]:
    """llama.cpp's KV cache and recurrent state per layer, from the log of its load: which layers
    each KV cache holds and with how many cells (an iSWA model has two caches), each layer's K and
    V widths, which layers keep a recurrent state; scaled so that they add up to ``total`` (the
    exact figure of the breakdown). [] where the log does not say."""
    widths: dict[str, list[int]] = {}
    kv: dict[int, float] = {}
    rs_layers: list[int] = []
    pending: list[int] = []
    kv_mib = rs_mib = 0.0
    for _level, line in lines:
        if m := _GQA.search(line):
            widths[m.group(1)] = [int(x) for x in re.findall(r"\d+", m.group(2))]
        elif m := _KV_LAYER.search(line):
            pending.append(int(m.group(1)))
        elif m := _KV_SIZE.search(line):
            kv_mib += float(m.group(1))
            cells = int(m.group(2))
            for il in pending:
                k, v = (_width(widths.get(x, []), il) for x in ("k", "v"))
                kv[il] = kv.get(il, 0.0) + (k + v) * cells
            pending = []
        elif m := _RS_LAYER.search(line):
            rs_layers.append(int(m.group(1)))
        elif m := _RS_SIZE.search(line):
            rs_mib += float(m.group(1))
    if not kv and not rs_layers:
        return []
    n = max([*kv, *rs_layers]) + 1
    kv_share = kv_mib / (kv_mib + rs_mib) if kv_mib + rs_mib > 0 else (1.0 if kv else 0.0)
    weight = [0.0] * n
    kv_sum = sum(kv.values())
    for il, w in kv.items():
        weight[il] += kv_share * w / kv_sum if kv_sum else 0.0
    for il in rs_layers:
        weight[il] += (1.0 - kv_share) / len(rs_layers)
    out = [int(total * w) for w in weight]
    if out and total:
        out[max(range(n), key=lambda i: weight[i])] += total - sum(out)
    return out


def _width(values: list[int], il: int) -> int:
    if not values:
        return 1
    return values[il] if il < len(values) else values[-1]


def main() -> None:
    """The child: jobs as JSON on stdin, one answer per line on stdout as each is known."""
    jobs = json.loads(sys.stdin.read())
    for key, path, opts in jobs:
        answer = _dry_run(path, RunOptions(**opts))
        sys.stdout.write(json.dumps({"key": key, "answer": answer}) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
