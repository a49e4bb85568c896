"""Hugging Face repos: references, quantizations, GGUF headers read by range request, and pulls.

Everything goes through huggingface_hub: its HTTP session (token, endpoint, proxies, offline switch),
its URL scheme and its cache layout, so HF_TOKEN, HF_ENDPOINT, HF_HUB_OFFLINE and HF_HUB_CACHE work as
users expect and other tools see what ``pull`` downloads. This module is imported late (it loads
huggingface_hub); it never imports typer or rich.

Flow: one API call lists the repo with file sizes and LFS sha256s (``RepoListing``); its GGUF files
are grouped into quantizations (``Quant``); ``fit`` reads only the headers of their files, growing a
range request until :func:`moelocal.gguf_model.parse_header` stops asking for more bytes; ``pull``
downloads a quantization into the HF cache, resumably, and checks every file's sha256.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from moelocal import config
from moelocal.errors import DownloadError, HubError, ModelFileError, MoelocalError, NeedMoreBytes, UsageError
from moelocal.gguf_model import Header, ModelSummary, parse_header, read_header_file, summarize
from moelocal.source import ModelRef, parse_ref
from moelocal.units import human_bytes

Progress = Callable[[int, int], None]

# Header reads. A header without a big vocabulary (a few KiB, or a split set's later shards) fits in
# the first read; one with a 32k-260k token vocabulary is 0.5-10 MiB. So: a small first read, then
# 1 MiB, then doubling, never fetching more than twice the header. The other quantizations of a repo
# share its vocabulary, so once one header is known the rest start at its size plus a little slack.
FIRST_READ = 64 << 10
SECOND_READ = 1 << 20
HEADER_SLACK = 64 << 10
READ_WORKERS = 8
RANGE_RETRIES = 2
# A branch's listing is reused this long (a second `fit` sends no request); a commit's forever.
LISTING_TTL_S = 3600
SHA256_BLOCK = 8 << 20

_REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
_SPLIT_RE = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$", re.IGNORECASE)
# The quantization at the end of a file stem: Q4_K_M, IQ2_XXS, UD-Q4_K_XL, BF16, MXFP4_MOE, TQ1_0 ...
_QUANT_RE = re.compile(
    r"(?:^|[-_.])((?:UD-)?(?:I?Q\d+(?:_[A-Z0-9]+)*|TQ\d_\d|B?F16|F32|MXFP4(?:_MOE)?))$", re.IGNORECASE
)
# GGUF files that are not a language model (as llama.cpp's -hf skips them)
_SIDECARS = ("mmproj", "imatrix", "mtp-", "eagle3-", "dflash-", "dspark-")


# ---- references --------------------------------------------------------------------------------


def parse_repo_ref(ref: ModelRef | str) -> ModelRef:
    """``org/repo``, ``org/repo:QUANT``, ``org/repo@REV``, ``org/repo:QUANT@REV`` or ``org/repo@REV:QUANT``."""
    if isinstance(ref, str):
        ref = parse_ref(ref)
    if ref.repo is None:
        raise UsageError(f"{ref.text} is not a Hugging Face repo", "write it as org/name[:QUANT][@REVISION]")
    revision, quant = ref.revision, ref.quant
    if revision and ":" in revision and quant is None:  # git refs cannot contain ":", so this is @REV:QUANT
        revision, quant = revision.split(":", 1)
    if not _REPO_RE.match(ref.repo) or "--" in ref.repo or ".." in ref.repo:
        raise UsageError(f"{ref.repo!r} is not a valid Hugging Face repo id", "write it as org/name")
    return replace(ref, quant=quant or None, revision=revision or None)


# ---- repo files and quantizations ---------------------------------------------------------------


@dataclass(frozen=True)
class HubFile:
    """One file of a repo: its path in the repo, size, and LFS sha256 (None for files kept in git)."""

    path: str
    size: int
    sha256: str | None = None
    blob_id: str | None = None

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def etag(self) -> str:
        """The name huggingface_hub gives its blob in the cache: the sha256 for LFS files, else the git id."""
        return self.sha256 or self.blob_id or ""


@dataclass(frozen=True)
class Quant:
    """One quantization of a repo: a single .gguf file or every shard of a split set."""

    repo: str
    commit: str
    name: str
    files: tuple[HubFile, ...]
    n_expected: int = 1  # shards the split set names (-of-0000N); 1 for a single file

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(f.path for f in self.files)

    @property
    def sha256s(self) -> tuple[str | None, ...]:
        return tuple(f.sha256 for f in self.files)

    @property
    def complete(self) -> bool:
        return len(self.files) == self.n_expected

    @property
    def ref(self) -> str:
        return f"{self.repo}:{self.name}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "repo": self.repo,
            "commit": self.commit,
            "quant": self.name,
            "size": self.size,
            "files": [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in self.files],
        }


@dataclass(frozen=True)
class RepoListing:
    """The GGUF files of a repo at one commit, as the Hub listed them (cached on disk)."""

    repo: str
    revision: str | None
    commit: str
    files: tuple[HubFile, ...]
    fetched: float
    gated: bool = False


def _shard(path: str) -> tuple[str, int, int] | None:
    """(stem, index, count) for ``stem-0000i-of-0000N.gguf`` (the name part only), else None."""
    m = _SPLIT_RE.match(path.rsplit("/", 1)[-1])
    return (m.group("stem"), int(m.group("no")), int(m.group("count"))) if m else None


def is_model_file(path: str) -> bool:
    """A .gguf file holding a language model, not a projector, imatrix or draft model."""
    name = path.rsplit("/", 1)[-1].lower()
    return name.endswith(".gguf") and not any(s in name for s in _SIDECARS)


def quant_name(path: str) -> str | None:
    """The quantization a file name states (``Qwen3-30B-A3B-Q4_K_M-00001-of-00002.gguf`` → Q4_K_M)."""
    directory, _, name = path.rpartition("/")
    shard = _shard(path)
    stem = shard[0] if shard else name[: -len(".gguf")] if name.lower().endswith(".gguf") else name
    for candidate in (stem, directory.rsplit("/", 1)[-1]):
        m = _QUANT_RE.search(candidate)
        if m:
            return m.group(1).upper()
    return None


def group_quants(repo: str, commit: str, files: Iterable[HubFile]) -> list[Quant]:
    """Group a repo's GGUF model files into quantizations (a split set is one), smallest first."""
    groups: dict[tuple[str, str], list[HubFile]] = {}
    expected: dict[tuple[str, str], int] = {}
    for f in files:
        if not is_model_file(f.path):
            continue
        directory = f.path.rpartition("/")[0]
        shard = _shard(f.path)
        key = (directory, shard[0] if shard else f.name[: -len(".gguf")])
        groups.setdefault(key, []).append(f)
        expected[key] = shard[2] if shard else 1
    named: dict[tuple[str, str], str] = {}
    for key, members in groups.items():
        named[key] = quant_name(members[0].path) or key[1]
    counts: dict[str, int] = {}
    for name in named.values():
        counts[name.lower()] = counts.get(name.lower(), 0) + 1
    quants = []
    for key, members in groups.items():
        name = named[key]
        if counts[name.lower()] > 1:  # two groups state the same quantization: tell them apart by file
            name = f"{key[0]}/{key[1]}" if key[0] else key[1]
        members.sort(key=lambda f: (_shard(f.path) or ("", 0, 0))[1])
        quants.append(Quant(repo=repo, commit=commit, name=name, files=tuple(members), n_expected=expected[key]))
    quants.sort(key=lambda q: (q.size, q.name))
    return quants


def select_quant(quants: Sequence[Quant], wanted: str | None, repo: str, where: str = "") -> Quant:
    """The quantization ``wanted`` names (case-insensitive, as llama.cpp's ``-hf repo:QUANT``);
    ``where`` qualifies the messages (" in the cache")."""
    if not quants:
        raise HubError(
            f"{repo} has no GGUF model files",
            "moelocal runs llama.cpp GGUF models; look for a GGUF repo (often named org/Model-GGUF)",
        )
    names = ", ".join(q.name for q in quants)
    if wanted is None:
        if len(quants) == 1:
            return _complete(quants[0])
        raise HubError(f"{repo} has {len(quants)} quantizations{where}; name one as {repo}:QUANT",
                       f"it has {names}")
    exact = [q for q in quants if q.name.lower() == wanted.lower()]
    if not exact:
        # llama.cpp's rule: the tag followed by "." or "-" anywhere in the (first) file's path
        pattern = re.compile(re.escape(wanted) + r"[.-]", re.IGNORECASE)
        exact = [q for q in quants if pattern.search(q.files[0].path)]
    if not exact:
        raise HubError(f"{repo} has no quantization {wanted}{where}", f"it has {names}")
    if len(exact) > 1:
        raise HubError(
            f"{wanted} matches several quantizations of {repo}: {', '.join(q.name for q in exact)}",
            "name one of them exactly",
        )
    return _complete(exact[0])


def _complete(q: Quant) -> Quant:
    if not q.complete:
        raise HubError(
            f"{q.repo} has only {len(q.files)} of the {q.n_expected} files of {q.name}",
            "the upload is incomplete; choose another quantization",
        )
    return q


# ---- huggingface_hub access --------------------------------------------------------------------


def _hf() -> Any:
    """huggingface_hub's constants module, read at call time (tests and users may change it)."""
    from huggingface_hub import constants

    return constants


def _offline() -> bool:
    c = _hf()
    check = getattr(c, "is_offline_mode", None)
    return bool(check() if check else c.HF_HUB_OFFLINE)


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache (HF_HUB_CACHE, else HF_HOME/hub), as huggingface_hub resolves it."""
    return Path(_hf().HF_HUB_CACHE).expanduser()


def _repo_cache(repo: str) -> Path:
    return hf_cache_dir() / ("models--" + repo.replace("/", "--"))


def _own_cache(repo: str) -> Path:
    return config.cache_dir("headers") / repo.replace("/", "--")


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# ---- listing ------------------------------------------------------------------------------------


def _listing_paths(repo: str, revision: str | None) -> tuple[Path, Path]:
    base = _own_cache(repo)
    return base / "refs" / quote(revision or "HEAD", safe=""), base


def _cached_listing(repo: str, revision: str | None) -> RepoListing | None:
    ref_path, base = _listing_paths(repo, revision)
    try:
        ref = json.loads(ref_path.read_text())
        data = json.loads((base / f"listing-{ref['commit']}.json").read_text())
        files = tuple(HubFile(**f) for f in data["files"])
        return RepoListing(repo, revision, ref["commit"], files, float(ref["fetched"]), bool(data.get("gated")))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _store_listing(listing: RepoListing) -> None:
    ref_path, base = _listing_paths(listing.repo, listing.revision)
    files = [{"path": f.path, "size": f.size, "sha256": f.sha256, "blob_id": f.blob_id} for f in listing.files]
    try:
        _write_atomic(base / f"listing-{listing.commit}.json",
                      json.dumps({"files": files, "gated": listing.gated}).encode())
        _write_atomic(ref_path, json.dumps({"commit": listing.commit, "fetched": listing.fetched}).encode())
    except OSError:
        pass  # a cache that cannot be written only costs a request next time


def _listing(ref: ModelRef, max_age: float = LISTING_TTL_S) -> RepoListing:
    """The repo's GGUF files: from moelocal's cache when fresh enough (or offline), else from the Hub."""
    cached = _cached_listing(ref.repo, ref.revision)
    if _offline():
        if cached is None:
            raise HubError(
                f"{ref.repo} has not been read before and offline mode is on (HF_HUB_OFFLINE)",
                "unset HF_HUB_OFFLINE to reach the Hub",
            )
        return cached
    pinned = ref.revision is not None and _COMMIT_RE.match(ref.revision) is not None
    if cached is not None and (pinned or time.time() - cached.fetched < max_age):
        return cached
    from huggingface_hub import HfApi

    try:
        info = HfApi().model_info(
            ref.repo, revision=ref.revision, files_metadata=True, timeout=_hf().HF_HUB_ETAG_TIMEOUT
        )
    except Exception as exc:
        if cached is not None and _is_connection_error(exc):
            return cached  # the Hub is out of reach: what we listed before is the best we have
        raise
    files = []
    for s in info.siblings or ():
        if not s.rfilename.lower().endswith(".gguf"):
            continue
        lfs = s.lfs
        size = (lfs.size if lfs else s.size) or 0
        files.append(HubFile(s.rfilename, int(size), lfs.sha256 if lfs else None, s.blob_id))
    listing = RepoListing(ref.repo, ref.revision, info.sha, tuple(files), time.time(), bool(info.gated))
    _store_listing(listing)
    return listing


def list_quants(ref: ModelRef | str) -> list[Quant]:
    """Every quantization the repo offers (GGUF model files grouped; projectors and imatrix left out)."""
    ref = parse_repo_ref(ref)
    with _hub_errors(ref):
        listing = _listing(ref)
    quants = group_quants(listing.repo, listing.commit, listing.files)
    if not quants:
        select_quant(quants, None, ref.repo)  # raises "no GGUF model files"
    return quants


# ---- headers ------------------------------------------------------------------------------------


class _RemoteFile:
    """A growing prefix of one file on the Hub, fetched with range requests through huggingface_hub's
    session. After the first request it asks the final (CDN) address directly, saving the redirect."""

    def __init__(self, url: str, headers: dict[str, str], size: int, label: str) -> None:
        self.url = url
        self.origin = urlsplit(url)[:2]
        self.headers = headers
        self.size = size
        self.label = label
        self.buf = bytearray()

    def extend_to(self, end: int) -> None:
        from huggingface_hub.utils import hf_raise_for_status, http_stream_backoff

        start, end = len(self.buf), min(end, self.size)
        if end <= start:
            return
        headers = {**self.headers, "Range": f"bytes={start}-{end - 1}", "Accept-Encoding": "identity"}
        got = 0
        with http_stream_backoff(
            "GET", self.url, headers=headers, timeout=_hf().HF_HUB_DOWNLOAD_TIMEOUT, max_retries=RANGE_RETRIES
        ) as r:
            hf_raise_for_status(r)
            # A server that ignores Range answers 200 with the whole file: skip to our part, stop early.
            skip = start if r.status_code == 200 else 0
            if r.status_code == 206 and not r.headers.get("Content-Range", "").startswith(f"bytes {start}-"):
                raise HubError(f"the Hub answered a range request for {self.label} with the wrong bytes")
            for chunk in r.iter_bytes(1 << 16):
                if skip:
                    drop = min(skip, len(chunk))
                    chunk, skip = chunk[drop:], skip - drop
                take = chunk[: end - start - got]
                self.buf += take
                got += len(take)
                if got >= end - start:
                    break
            final = str(r.url)
        if got < end - start:
            raise HubError(f"the Hub sent {got} of the {end - start} bytes asked for in {self.label}", "try again")
        if final != self.url:
            self.url = final
            if urlsplit(final)[:2] != self.origin:
                # a signed CDN address: never send it the user's token (httpx drops it on redirects too)
                self.headers = {k: v for k, v in self.headers.items() if k.lower() != "authorization"}


def _header_cache_path(repo: str, commit: str, f: HubFile) -> Path:
    # by content when the Hub gives a sha256: a new commit that keeps a file keeps its header
    base = _own_cache(repo)
    if f.sha256:
        return base / "sha256" / f"{f.sha256}.gguf-header"
    return base / commit / (f.path + ".gguf-header")


def _local_copy(repo: str, commit: str, f: HubFile) -> Path | None:
    """The file in the HF cache, when it has been downloaded (by moelocal or any other tool)."""
    hf_repo = _repo_cache(repo)
    for path in (hf_repo / "snapshots" / commit / f.path, hf_repo / "blobs" / f.etag if f.etag else None):
        if path is not None and path.is_file() and path.stat().st_size == f.size:
            return path
    return None


def _cached_header(repo: str, commit: str, f: HubFile) -> Header | None:
    local = _local_copy(repo, commit, f)
    if local is not None:
        return read_header_file(local)[0]
    try:
        raw = _header_cache_path(repo, commit, f).read_bytes()
        return parse_header(raw, complete=False, label=f.path)
    except (OSError, MoelocalError):
        return None  # absent or damaged: read it again


def _fetch_header(repo: str, commit: str, f: HubFile, first: int) -> tuple[Header, int]:
    """Read one file's header over HTTP; returns it and the bytes fetched."""
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers

    remote = _RemoteFile(hf_hub_url(repo, f.path, revision=commit), build_hf_headers(), f.size, f.path)
    want = first
    while True:
        remote.extend_to(want)
        have = len(remote.buf)
        try:
            header = parse_header(remote.buf, complete=have >= f.size, label=f.path)
            break
        except NeedMoreBytes as more:
            step = SECOND_READ if have < SECOND_READ else 2 * have
            want = max(step, more.needed + HEADER_SLACK)
    raw = bytes(remote.buf[: min(have, header.data_offset)])
    try:
        _write_atomic(_header_cache_path(repo, commit, f), raw)
    except OSError:
        pass
    return header, have


def read_headers(repo: str, commit: str, files: Sequence[HubFile]) -> dict[str, Header]:
    """Headers of these files (path → Header): cached, local, or read from the Hub by range requests."""
    out: dict[str, Header] = {}
    todo = []
    for f in files:
        header = _cached_header(repo, commit, f)
        if header is None:
            todo.append(f)
        else:
            out[f.path] = header
    if not todo:
        return out
    if _offline():
        raise HubError(
            f"the header of {repo}/{todo[0].path} has not been read before and offline mode is on (HF_HUB_OFFLINE)",
            "unset HF_HUB_OFFLINE to reach the Hub",
        )
    # First shards carry the vocabulary; read one to learn its size, then the rest in parallel.
    firsts = [f for f in todo if (_shard(f.path) or ("", 1, 1))[1] == 1]
    jobs: list[tuple[HubFile, int]] = [(f, FIRST_READ) for f in todo if f not in firsts]
    if firsts:
        header, fetched = _fetch_header(repo, commit, firsts[0], FIRST_READ)
        out[firsts[0].path] = header
        # a header that fitted the first read says nothing about the others' size; a bigger one does
        hint = FIRST_READ if fetched <= FIRST_READ else header.data_offset + HEADER_SLACK
        jobs += [(f, hint) for f in firsts[1:]]
    if jobs:
        with ThreadPoolExecutor(max_workers=min(READ_WORKERS, len(jobs))) as pool:
            results = list(pool.map(lambda job: _fetch_header(repo, commit, *job), jobs))
        for (f, _), (header, _) in zip(jobs, results, strict=True):
            out[f.path] = header
    return out


def _summary(q: Quant, headers: dict[str, Header]) -> ModelSummary:
    return summarize([headers[f.path] for f in q.files], [f"{q.repo}/{f.path}" for f in q.files], q.size)


def summary_for_ref(ref: ModelRef | str) -> ModelSummary:
    """The ModelSummary of one quantization (the one named; the only one; else an error listing them)."""
    ref = parse_repo_ref(ref)
    with _hub_errors(ref):
        listing = _listing(ref)
        q = select_quant(group_quants(listing.repo, listing.commit, listing.files), ref.quant, ref.repo)
        return _summary(q, read_headers(ref.repo, listing.commit, q.files))


def summaries_for_repo(ref: ModelRef | str) -> list[tuple[Quant, ModelSummary]]:
    """Every complete quantization of the repo (or the one named) with its summary, from headers alone."""
    ref = parse_repo_ref(ref)
    with _hub_errors(ref):
        listing = _listing(ref)
        quants = group_quants(listing.repo, listing.commit, listing.files)
        if ref.quant is not None or not quants:
            quants = [select_quant(quants, ref.quant, ref.repo)]
        else:
            quants = [q for q in quants if q.complete] or [_complete(quants[0])]
        headers = read_headers(ref.repo, listing.commit, [f for q in quants for f in q.files])
        return [(q, _summary(q, headers)) for q in quants]


# ---- downloads ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannedFile:
    file: HubFile
    local_path: Path  # where it is (or will be) in the HF cache: snapshots/<commit>/<path>
    cached: bool
    partial: int  # bytes an interrupted download left, resumed from there


@dataclass(frozen=True)
class DownloadPlan:
    """What ``download`` will fetch, shown to the user before anything is downloaded."""

    repo: str
    revision: str
    commit: str
    quant: Quant
    files: tuple[PlannedFile, ...]
    cache_dir: Path  # the repo's folder in the HF cache
    free: int  # bytes free on its disk

    @property
    def size(self) -> int:
        return self.quant.size

    @property
    def to_download(self) -> int:
        return sum(p.file.size - p.partial for p in self.files if not p.cached)

    @property
    def paths(self) -> list[Path]:
        return [p.local_path for p in self.files]

    def to_dict(self) -> dict[str, Any]:
        return {
            "repo": self.repo,
            "revision": self.revision,
            "commit": self.commit,
            "quant": self.quant.name,
            "size": self.size,
            "to_download": self.to_download,
            "cache_dir": str(self.cache_dir),
            "free": self.free,
            "files": [
                {"path": p.file.path, "size": p.file.size, "sha256": p.file.sha256, "local_path": str(p.local_path),
                 "cached": p.cached, "partial": p.partial}
                for p in self.files
            ],
        }


def _free_space(path: Path) -> int:
    for p in (path, *path.parents):
        if p.exists():
            return shutil.disk_usage(p).free
    return 0


def _blob_paths(plan_dir: Path, f: HubFile) -> tuple[Path, Path]:
    blob = plan_dir / "blobs" / f.etag
    return blob, blob.with_name(blob.name + ".incomplete")


def plan_download(ref: ModelRef | str, quant: str | None = None) -> DownloadPlan:
    """Resolve the quantization to download against the Hub as it is now, and see what is already here."""
    ref = parse_repo_ref(ref)
    wanted = quant or ref.quant
    with _hub_errors(ref):
        listing = _listing(ref, max_age=0)  # what is downloaded must match the Hub now, not an old listing
        q = select_quant(group_quants(listing.repo, listing.commit, listing.files), wanted, ref.repo)
    if listing.gated and not _offline():
        from huggingface_hub import get_token

        if not get_token():  # say so now rather than after the plan was shown and agreed to
            raise _gated_error(ref.repo, has_token=False)
    repo_dir = _repo_cache(ref.repo)
    planned = []
    for f in q.files:
        pointer = repo_dir / "snapshots" / listing.commit / f.path
        blob, partial = _blob_paths(repo_dir, f)
        cached = any(p.is_file() and p.stat().st_size == f.size for p in (pointer, blob))
        resumed = partial.stat().st_size if partial.is_file() and not cached else 0
        planned.append(PlannedFile(f, pointer, cached, resumed if resumed <= f.size else 0))
    return DownloadPlan(ref.repo, ref.revision or "main", listing.commit, q, tuple(planned), repo_dir,
                        _free_space(repo_dir))


def download(plan: DownloadPlan, progress: Progress | None = None, verify_cached: bool = False) -> list[Path]:
    """Fetch what the plan lacks into the HF cache; returns the local paths of every file, in order.

    Interrupted downloads resume from their ``.incomplete`` file; every file downloaded is checked
    against its sha256 before it gets its final name, and one that fails is fetched once more.
    ``verify_cached`` also checks files already in the cache (and replaces a bad one).
    """
    missing = [p for p in plan.files if not p.cached]
    if missing and _offline():
        raise HubError(
            f"{len(missing)} of the files of {plan.quant.ref} are not downloaded "
            "and offline mode is on (HF_HUB_OFFLINE)",
            "unset HF_HUB_OFFLINE to download them",
        )
    hb = human_bytes
    need = plan.to_download
    free = _free_space(plan.cache_dir)
    if need > free:
        raise DownloadError(
            f"not enough disk space: {plan.quant.ref} needs {hb(need)} more in {plan.cache_dir}, "
            f"which has {hb(free)} free",
            "free some space, or set HF_HUB_CACHE to a folder on a bigger disk",
        )
    state = {"done": 0, "total": need}

    def on_bytes(n: int) -> None:
        state["done"] += n
        if progress is not None:
            progress(state["done"], state["total"])

    def on_retry(n: int) -> None:
        state["total"] += n
        on_bytes(0)

    on_bytes(0)
    ref = ModelRef(text=plan.quant.ref, repo=plan.repo)
    with _hub_errors(ref):
        for p in plan.files:
            if p.cached and not verify_cached:
                _link(_blob_paths(plan.cache_dir, p.file)[0], p.local_path, only_if_missing=True)
                continue
            _fetch_file(plan, p, on_bytes, on_retry)
    if plan.revision != plan.commit:
        try:  # as hf_hub_download does, so `main` resolves to this commit offline, for every tool
            _write_atomic(plan.cache_dir / "refs" / plan.revision, plan.commit.encode())
        except OSError:
            pass
    return plan.paths


def pull(ref: ModelRef | str, quant: str | None = None, progress_callback: Progress | None = None) -> list[Path]:
    """Download a quantization (named by ``quant`` or the ref) into the HF cache; the local paths."""
    return download(plan_download(ref, quant), progress_callback)


def _fetch_file(plan: DownloadPlan, p: PlannedFile, on_bytes: Callable[[int], None],
                on_retry: Callable[[int], None]) -> None:
    from huggingface_hub.utils import WeakFileLock

    f = p.file
    blob, incomplete = _blob_paths(plan.cache_dir, f)
    lock = hf_cache_dir() / ".locks" / plan.cache_dir.name / f"{f.etag}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with WeakFileLock(lock):  # the lock hf_hub_download takes for the same blob
        if blob.is_file() and blob.stat().st_size == f.size:
            if f.sha256 is None or not p.cached or _sha256(blob) == f.sha256:
                _link(blob, p.local_path)
                return
            _remove(p.local_path, blob)  # a bad blob: nothing that looks complete may stay
            on_retry(f.size)
        for attempt in range(2):
            _http_download(plan, f, incomplete, on_bytes)
            digest = _sha256(incomplete) if f.sha256 else None
            if digest == f.sha256:
                os.replace(incomplete, blob)
                _link(blob, p.local_path)
                return
            incomplete.unlink(missing_ok=True)
            if attempt == 0:
                on_retry(f.size)
        _remove(p.local_path, blob)
        raise DownloadError(
            f"{f.path} does not match its sha256 from the Hub after 2 downloads, so it was deleted",
            "run the command again; if it keeps failing, the file on the Hub or a proxy on the way is corrupt",
        )


def _http_download(plan: DownloadPlan, f: HubFile, incomplete: Path, on_bytes: Callable[[int], None]) -> None:
    """Append the rest of ``f`` to ``incomplete`` with huggingface_hub's http_get (which also resumes
    within the run when a connection drops), from the byte where a previous run stopped."""
    from huggingface_hub import hf_hub_url
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    incomplete.parent.mkdir(parents=True, exist_ok=True)
    resume = incomplete.stat().st_size if incomplete.exists() else 0
    if resume > f.size:
        incomplete.unlink()
        resume = 0

    class _Bar:  # what http_get takes as its progress bar: forwards byte counts, draws nothing
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            pass

        def update(self, n: float = 1) -> None:
            on_bytes(int(n))

        def close(self) -> None:
            pass

        def __enter__(self) -> _Bar:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

    url = hf_hub_url(plan.repo, f.path, revision=plan.commit)
    try:
        with open(incomplete, "ab") as fh:
            http_get(url, fh, resume_size=resume, headers=build_hf_headers(), expected_size=f.size,
                     displayed_filename=f.name, tqdm_class=_Bar)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise DownloadError(
                f"the disk filled up while downloading {f.path} into {plan.cache_dir}",
                "free some space and run the command again; the download resumes where it stopped",
            ) from exc
        if "Consistency check failed" in str(exc):  # the server sent another size: start this file afresh
            incomplete.unlink(missing_ok=True)
            raise DownloadError(f"the Hub sent {f.path} with a size other than its listed {f.size} bytes",
                                "run the command again") from exc
        raise


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(SHA256_BLOCK):
            h.update(block)
    return h.hexdigest()


def _link(blob: Path, pointer: Path, only_if_missing: bool = False) -> None:
    """Point snapshots/<commit>/<path> at the blob, as huggingface_hub lays out its cache."""
    if only_if_missing and pointer.is_file():
        return
    pointer.parent.mkdir(parents=True, exist_ok=True)
    if pointer.is_symlink() or pointer.exists():
        pointer.unlink()
    try:
        pointer.symlink_to(os.path.relpath(blob, pointer.parent))
    except OSError:  # no symlinks (Windows without developer mode): a hard link, else a copy
        try:
            os.link(blob, pointer)
        except OSError:
            shutil.copyfile(blob, pointer)


def _remove(*paths: Path) -> None:
    for path in paths:
        if path.is_symlink() or path.exists():
            path.unlink()


# ---- what is in the HF cache --------------------------------------------------------------------


@dataclass(frozen=True)
class CachedModel:
    """One quantization found in the HF cache, at one commit."""

    repo: str
    commit: str
    refs: tuple[str, ...]
    quant: str
    files: tuple[Path, ...]  # snapshot paths, shards in order
    size: int
    n_expected: int

    @property
    def complete(self) -> bool:
        return len(self.files) == self.n_expected

    @property
    def ref(self) -> str:
        return f"{self.repo}:{self.quant}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "repo": self.repo,
            "quant": self.quant,
            "commit": self.commit,
            "refs": list(self.refs),
            "size": self.size,
            "files": [str(p) for p in self.files],
            "complete": self.complete,
        }


def _scan() -> Any:
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.utils import CacheNotFound

    try:
        return scan_cache_dir(hf_cache_dir())  # explicit: its default is fixed when it is imported
    except CacheNotFound:
        return None


def cached_models(repo: str | None = None) -> list[CachedModel]:
    """The GGUF quantizations in the HF cache (of one repo, or all), sorted by repo and size."""
    info = _scan()
    if info is None:
        return []
    out = []
    for r in info.repos:
        if r.repo_type != "model" or (repo is not None and r.repo_id.lower() != repo.lower()):
            continue
        for rev in r.revisions:
            files = [HubFile(f.file_path.relative_to(rev.snapshot_path).as_posix(), f.size_on_disk)
                     for f in rev.files]
            for q in group_quants(r.repo_id, rev.commit_hash, files):
                out.append(CachedModel(r.repo_id, rev.commit_hash, tuple(sorted(rev.refs)), q.name,
                                       tuple(rev.snapshot_path / f.path for f in q.files), q.size, q.n_expected))
    out.sort(key=lambda m: (m.repo.lower(), m.size, m.commit))
    return out


def local_model(ref: ModelRef | str, quant: str | None = None) -> Path:
    """The first file of a downloaded quantization (what llama.cpp opens), found without any request.

    The revision (default main) is looked up in the cache's refs; raises HubError saying how to pull
    the model when it is not (completely) downloaded.
    """
    ref = parse_repo_ref(ref)
    wanted = quant or ref.quant
    revision = ref.revision or "main"
    found = [m for m in cached_models(ref.repo) if m.complete]
    if _COMMIT_RE.match(revision):
        found = [m for m in found if m.commit == revision]
    elif ref.revision is not None:
        found = [m for m in found if revision in m.refs]
    else:  # the commit main points at first, then any other one downloaded
        found.sort(key=lambda m: revision not in m.refs)
    if not found:
        raise HubError(f"{ref.text} is not downloaded yet", f"download it first with `moelocal pull {ref.text}`")
    quants: dict[str, Quant] = {}
    for m in found:
        quants.setdefault(m.quant, Quant(m.repo, m.commit, m.quant, tuple(HubFile(str(p), 0) for p in m.files),
                                         m.n_expected))
    try:
        q = select_quant(list(quants.values()), wanted, ref.repo, where=" downloaded")
    except HubError as exc:
        raise HubError(exc.message, f"{exc.hint}; `moelocal pull {ref.repo}:QUANT` downloads another") from None
    return Path(q.files[0].path)


@dataclass(frozen=True)
class Removal:
    """What ``remove`` deletes from the HF cache."""

    repo: str
    quant: str | None  # None: the whole repo
    files: tuple[Path, ...]
    freed: int
    strategy: Any  # huggingface_hub's DeleteCacheStrategy


def plan_removal(ref: ModelRef | str, quant: str | None = None) -> Removal:
    """The files of a repo (or of one of its quantizations) in the HF cache, every revision."""
    ref = parse_repo_ref(ref)
    wanted = quant or ref.quant
    info = _scan()
    repo = next((r for r in (info.repos if info else ()) if r.repo_type == "model"
                 and r.repo_id.lower() == ref.repo.lower()), None)
    if repo is None:
        raise ModelFileError(f"{ref.repo} is not in the Hugging Face cache ({hf_cache_dir()})",
                             "see what is there with `moelocal list`")
    if wanted is None:
        files = tuple(sorted(f.file_path for rev in repo.revisions for f in rev.files))
        strategy = info.delete_revisions(*(rev.commit_hash for rev in repo.revisions))
        return Removal(repo.repo_id, None, files, strategy.expected_freed_size, strategy)
    models = cached_models(repo.repo_id)
    by_name = {m.quant: m for m in models}
    quants = [Quant(m.repo, m.commit, m.quant, tuple(HubFile(str(p), m.size) for p in m.files), len(m.files))
              for m in by_name.values()]
    try:
        name = select_quant(quants, wanted, repo.repo_id, where=" in the cache").name
    except HubError as exc:
        raise ModelFileError(exc.message, exc.hint) from None
    paths = {p for m in models if m.quant == name for p in m.files}
    chosen = [f for rev in repo.revisions for f in rev.files if f.file_path in paths]
    strategy = info.delete_files(*chosen)
    return Removal(repo.repo_id, name, tuple(sorted(paths)), strategy.expected_freed_size, strategy)


def remove(removal: Removal) -> None:
    """Delete what ``plan_removal`` found, through huggingface_hub's cache API."""
    removal.strategy.execute()


# ---- errors -------------------------------------------------------------------------------------


@contextmanager
def _hub_errors(ref: ModelRef | None) -> Iterator[None]:
    """huggingface_hub's and the network's errors, as one-line HubErrors about this ref."""
    try:
        yield
    except MoelocalError:
        raise
    except Exception as exc:
        mapped = translate_hub_error(exc, ref)
        if mapped is None:
            raise
        raise mapped from exc


def _network_errors(*names: str) -> tuple[type, ...]:
    """These exception classes of httpx2, httpx and requests, from whichever of them is loaded."""
    kinds = []
    for module in ("httpx2", "httpx", "requests"):
        mod = sys.modules.get(module)
        kinds += [getattr(mod, n) for n in names if mod is not None and isinstance(getattr(mod, n, None), type)]
    return tuple(kinds)


def _is_connection_error(exc: BaseException) -> bool:
    """The Hub cannot be reached: connection refused, DNS failure, proxy, connect timeout."""
    return isinstance(exc, _network_errors("ConnectError", "ConnectTimeout", "ProxyError", "ConnectionError"))


def _is_broken_transfer(exc: BaseException) -> bool:
    """A connection that was made and then broke (reset, closed early, read timeout)."""
    return isinstance(exc, _network_errors("TransportError", "Timeout", "ChunkedEncodingError"))


def _gated_error(repo: str, has_token: bool) -> HubError:
    url = f"{_hf().ENDPOINT}/{repo}"
    if has_token:
        return HubError(f"your Hugging Face token has no access to the gated repo {repo}",
                        f"accept its terms at {url} with the account of that token")
    return HubError(f"{repo} is a gated repo and needs an access token",
                    f"accept its terms at {url}, then log in with `hf auth login` or set HF_TOKEN")


def translate_hub_error(exc: BaseException, ref: ModelRef | None = None) -> MoelocalError | None:
    """huggingface_hub's (and the network's) errors → a one-line HubError with the next step; None for
    anything else. The CLI calls it for every error that is not already a MoelocalError."""
    try:
        from huggingface_hub import errors as hf_errors
    except ImportError:
        return None
    endpoint = _hf().ENDPOINT
    repo = ref.repo if ref is not None and ref.repo else getattr(exc, "repo_id", None) or "the repo"
    login = "log in with `hf auth login` or set HF_TOKEN"
    offline = getattr(hf_errors, "OfflineModeIsEnabled", None)
    if offline is not None and isinstance(exc, offline):
        return HubError(f"{repo} is not in the cache and offline mode is on (HF_HUB_OFFLINE)",
                        "unset HF_HUB_OFFLINE to reach the Hub")
    if isinstance(exc, hf_errors.GatedRepoError):
        from huggingface_hub import get_token

        return _gated_error(repo, has_token=bool(get_token()))
    if isinstance(exc, hf_errors.RepositoryNotFoundError):
        return HubError(f"{repo} was not found on the Hugging Face Hub", f"check the name; if it is private, {login}")
    if isinstance(exc, hf_errors.RevisionNotFoundError):
        revision = ref.revision if ref is not None and ref.revision else "that revision"
        return HubError(f"{repo} has no revision {revision}", "check the branch, tag or commit after @")
    if isinstance(exc, getattr(hf_errors, "LocalEntryNotFoundError", ())) or _is_connection_error(exc):
        return HubError(f"cannot reach the Hugging Face Hub at {endpoint}",
                        "check your network or proxy; to use models already downloaded, set HF_HUB_OFFLINE=1")
    if _is_broken_transfer(exc):
        return HubError(f"the connection to the Hugging Face Hub at {endpoint} broke off",
                        "run the command again; a download resumes where it stopped")
    if isinstance(exc, hf_errors.EntryNotFoundError):
        return HubError(f"a file of {repo} is no longer on the Hub", "run the command again to list the repo afresh")
    if isinstance(exc, hf_errors.HfHubHTTPError):
        status = exc.response.status_code if getattr(exc, "response", None) is not None else "an error"
        return HubError(f"the Hugging Face Hub answered {status} for {repo}", "try again later")
    if isinstance(exc, getattr(hf_errors, "HFValidationError", ())):
        return UsageError(f"{repo!r} is not a valid Hugging Face repo id", "write it as org/name")
    return None
