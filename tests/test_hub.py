"""Hugging Face repos against a local stand-in for the Hub (tests/hubserver.py).

huggingface_hub is pointed at the stand-in with HF_ENDPOINT and the constants it derives from it at
import; every test gets its own HF cache and moelocal home. The served repos hold the generated
qwen3moe test models in three quantizations, one of them a split set of three shards.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
from pathlib import Path

import gguf
import numpy as np
import pytest
from hubserver import FakeHub

from moelocal import cli, hub, testmodels
from moelocal.commands import models as models_cmd
from moelocal.commands import pull as pull_cmd
from moelocal.errors import DownloadError, HubError, ModelFileError, UsageError
from moelocal.gguf_model import parse_header, read_summary
from moelocal.hub import HubFile

REPO = "moelocal-test/Qwen3-MoE-GGUF"
GATED = "moelocal-test/Gated-GGUF"
EMPTY = "moelocal-test/safetensors-only"
Q8 = "qwen3moe-Q8_0.gguf"
Q4 = "qwen3moe-Q4_K.gguf"
SHARDS = [f"F16/qwen3moe-F16-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
CHUNK = 64 << 10  # huggingface_hub's download chunk in these tests (10 MiB by default)


# ---- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def repo_files(model_dir: Path, split_model: Path) -> dict[str, Path | bytes]:
    """The files of REPO: two single-file quantizations, a split set in a folder, and non-models."""
    built = testmodels.build_all(model_dir, archs=("qwen3moe",))  # the files the `models` fixture has
    files: dict[str, Path | bytes] = {
        "README.md": b"# qwen3moe test model\n",
        Q8: built["qwen3moe-q8_0"],
        Q4: built["qwen3moe-q4_k"],
        "mmproj-qwen3moe-F16.gguf": built["qwen3moe-f16"],  # a projector, not a model: left out
        "qwen3moe.imatrix.gguf": b"GGUF not a model",
    }
    for i, name in enumerate(SHARDS, start=1):
        files[name] = split_model.with_name(f"qwen3moe-f16-0000{i}-of-00003.gguf")
    return files


def data(files: dict[str, Path | bytes], name: str) -> bytes:
    value = files[name]
    return value.read_bytes() if isinstance(value, Path) else value


@pytest.fixture
def fake_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, repo_files: dict[str, Path | bytes]):
    from huggingface_hub import constants
    from huggingface_hub.utils import close_session

    server = FakeHub().start()
    server.add_repo(REPO, repo_files)
    server.add_repo(GATED, {"gated-Q8_0.gguf": repo_files[Q8]}, gated=True)
    server.add_repo(EMPTY, {"README.md": b"x", "model.safetensors": b"\0" * 64})
    endpoint = server.endpoint
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)  # huggingface_hub reads HF_ENDPOINT at import
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", CHUNK)  # so that a small test file has many chunks
    # huggingface_hub fetches a registry of AI agents once per process for its user agent: not from here
    monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(home / "agent_harnesses.json"), raising=False)
    monkeypatch.setattr("huggingface_hub.utils._detect_agent._registry", {"standardEnvVars": [], "harnesses": {}},
                        raising=False)
    yield server
    server.close()
    close_session()  # its pooled connections point at the closed server


def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def sha256(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def snapshot(server: FakeHub, path: str) -> Path:
    from huggingface_hub import constants

    commit = server.repos[REPO].commit
    return Path(constants.HF_HUB_CACHE) / f"models--{REPO.replace('/', '--')}" / "snapshots" / commit / path


def cdn_gets(server: FakeHub) -> list[tuple[str | None, str | None]]:
    return [(r.file, r.range) for r in server.requests if r.server == "cdn" and r.method == "GET"]


# ---- references and quantizations (no server) ------------------------------------------------


@pytest.mark.parametrize(
    ("text", "repo", "quant", "revision"),
    [
        ("org/Model-GGUF", "org/Model-GGUF", None, None),
        ("org/Model-GGUF:q4_k_m", "org/Model-GGUF", "q4_k_m", None),
        ("org/Model-GGUF@v1.0", "org/Model-GGUF", None, "v1.0"),
        ("org/Model-GGUF:Q8_0@dev", "org/Model-GGUF", "Q8_0", "dev"),
        ("org/Model-GGUF@dev:Q8_0", "org/Model-GGUF", "Q8_0", "dev"),
    ],
)
def test_parse_repo_ref(text: str, repo: str, quant: str | None, revision: str | None) -> None:
    ref = hub.parse_repo_ref(text)
    assert (ref.repo, ref.quant, ref.revision) == (repo, quant, revision)


def test_parse_repo_ref_refuses_what_is_not_a_repo() -> None:
    with pytest.raises(UsageError) as e:
        hub.parse_repo_ref("org/bad--name")
    assert str(e.value) == "'org/bad--name' is not a valid Hugging Face repo id (write it as org/name)"
    with pytest.raises(UsageError) as e:
        hub.parse_repo_ref("./model.gguf")
    assert str(e.value) == "./model.gguf is not a Hugging Face repo (write it as org/name[:QUANT][@REVISION])"


@pytest.mark.parametrize(
    ("path", "name"),
    [
        ("Qwen3-30B-A3B-Q4_K_M.gguf", "Q4_K_M"),
        ("Qwen3-30B-A3B-UD-Q4_K_XL-00001-of-00002.gguf", "UD-Q4_K_XL"),
        ("llama-2-7b.Q5_K_S.gguf", "Q5_K_S"),
        ("DeepSeek-R1-IQ2_XXS.gguf", "IQ2_XXS"),
        ("gpt-oss-20b-mxfp4.gguf", "MXFP4"),
        ("model-bf16.gguf", "BF16"),
        ("Q8_0/model-00001-of-00003.gguf", "Q8_0"),  # only the folder says it
        ("model.gguf", None),
    ],
)
def test_quant_name(path: str, name: str | None) -> None:
    assert hub.quant_name(path) == name


def test_group_quants_joins_split_sets_and_leaves_out_projectors() -> None:
    files = [HubFile(p, s) for p, s in [
        ("Model-Q4_K_M.gguf", 40), ("Model-Q8_0.gguf", 80),
        ("BF16/Model-BF16-00002-of-00002.gguf", 70), ("BF16/Model-BF16-00001-of-00002.gguf", 90),
        ("UD-Q2_K_XL/Model-UD-Q2_K_XL-00001-of-00003.gguf", 10),  # two of three shards uploaded
        ("UD-Q2_K_XL/Model-UD-Q2_K_XL-00002-of-00003.gguf", 10),
        ("mmproj-Model-F16.gguf", 5), ("Model.imatrix.gguf", 1), ("README.md", 1), ("mtp-Model-Q8_0.gguf", 3),
    ]]
    quants = hub.group_quants("org/m", "c" * 40, files)
    assert [(q.name, q.paths, q.size, q.complete) for q in quants] == [
        ("UD-Q2_K_XL", ("UD-Q2_K_XL/Model-UD-Q2_K_XL-00001-of-00003.gguf",
                        "UD-Q2_K_XL/Model-UD-Q2_K_XL-00002-of-00003.gguf"), 20, False),
        ("Q4_K_M", ("Model-Q4_K_M.gguf",), 40, True),
        ("Q8_0", ("Model-Q8_0.gguf",), 80, True),
        ("BF16", ("BF16/Model-BF16-00001-of-00002.gguf", "BF16/Model-BF16-00002-of-00002.gguf"), 160, True),
    ]


def test_group_quants_tells_apart_two_files_of_one_type() -> None:
    files = [HubFile("a/Model-Q4_0.gguf", 1), HubFile("b/Model-Q4_0.gguf", 2), HubFile("Model-F16.gguf", 3)]
    assert [q.name for q in hub.group_quants("org/m", "c" * 40, files)] == ["a/Model-Q4_0", "b/Model-Q4_0", "F16"]


def test_select_quant_matches_as_llama_cpp_does() -> None:
    files = [HubFile(p, 1) for p in ("M-Q4_K_M.gguf", "M-Q4_K_S.gguf", "M-Q8_0.gguf", "M-UD-Q2_K_XL.gguf")]
    quants = hub.group_quants("org/m", "c" * 40, files)
    assert hub.select_quant(quants, "q4_k_m", "org/m").name == "Q4_K_M"
    assert hub.select_quant(quants, "Q2_K_XL", "org/m").name == "UD-Q2_K_XL"  # the tag inside the file name
    with pytest.raises(HubError) as e:
        hub.select_quant(quants, "Q5_K_M", "org/m")
    assert str(e.value) == "org/m has no quantization Q5_K_M (it has Q4_K_M, Q4_K_S, Q8_0, UD-Q2_K_XL)"
    with pytest.raises(HubError) as e:
        hub.select_quant(quants, None, "org/m")
    assert str(e.value) == ("org/m has 4 quantizations; name one as org/m:QUANT "
                            "(it has Q4_K_M, Q4_K_S, Q8_0, UD-Q2_K_XL)")


# ---- listing and headers ---------------------------------------------------------------------


def test_list_quants(fake_hub: FakeHub, repo_files: dict) -> None:
    quants = hub.list_quants(REPO)
    assert [(q.name, q.paths) for q in quants] == [("Q4_K", (Q4,)), ("Q8_0", (Q8,)), ("F16", tuple(SHARDS))]
    for q in quants:
        assert q.commit == fake_hub.repos[REPO].commit
        assert q.size == sum(len(data(repo_files, p)) for p in q.paths)
        assert q.sha256s == tuple(sha256(data(repo_files, p)) for p in q.paths)
    assert [(r.method, r.path) for r in fake_hub.requests] == [("GET", f"/api/models/{REPO}")]


def test_the_stand_in_speaks_huggingface_hubs_api(fake_hub: FakeHub, repo_files: dict) -> None:
    from huggingface_hub import HfApi

    commit = fake_hub.repos[REPO].commit
    tree = {f.path: f for f in HfApi().list_repo_tree(REPO, recursive=True)}
    assert sorted(tree) == sorted(repo_files)
    assert tree[Q8].lfs.sha256 == sha256(data(repo_files, Q8)) and tree["README.md"].lfs is None
    assert [q.commit for q in hub.list_quants(f"{REPO}@main")] == [commit] * 3
    assert [q.name for q in hub.list_quants(f"{REPO}@{commit}")] == ["Q4_K", "Q8_0", "F16"]
    assert ("GET", f"/api/models/{REPO}/revision/{commit}") in [(r.method, r.path) for r in fake_hub.requests]


def test_fit_reads_only_headers_and_a_second_read_sends_nothing(fake_hub: FakeHub, repo_files: dict,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    pairs = hub.summaries_for_repo(REPO)
    assert [q.name for q, _ in pairs] == ["Q4_K", "Q8_0", "F16"]
    models = [Q4, Q8, *SHARDS]
    for name in models:
        content = data(repo_files, name)
        header_end = parse_header(content).data_offset
        sent = fake_hub.sent[f"{REPO}/{name}"]
        # one range request of the first-read size: the header (13-15 KiB here) and the slack, no more
        assert [r.range for r in fake_hub.file_requests(f"{REPO}/{name}")] == ["bytes=0-65535"], name
        assert sent == hub.FIRST_READ
        assert header_end < sent <= header_end + hub.HEADER_SLACK < len(content)
    assert set(fake_hub.sent) == {f"{REPO}/{name}" for name in models}  # never the projector or README
    # the summary from headers read over HTTP is the one of the local files
    for (q, s), local in zip(pairs, [repo_files[Q4], repo_files[Q8], repo_files[SHARDS[0]]], strict=True):
        expected = read_summary(local).to_dict()
        got = s.to_dict()
        assert got["files"] == [f"{REPO}/{p}" for p in q.paths]
        assert {k: v for k, v in got.items() if k != "files"} == {k: v for k, v in expected.items() if k != "files"}

    fake_hub.reset_counts()
    again = hub.summaries_for_repo(REPO)
    assert fake_hub.requests == []
    assert [s.to_dict() for _, s in again] == [s.to_dict() for _, s in pairs]
    offline(monkeypatch)
    assert hub.summary_for_ref(f"{REPO}:q8_0").to_dict() == pairs[1][1].to_dict()
    assert fake_hub.requests == []


@pytest.fixture(scope="module")
def big_vocab(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes]:
    """Two 'quantizations' of a model with a 150k-token vocabulary: a 6.7 MB header, as real ones have."""
    path = tmp_path_factory.mktemp("bigvocab") / "big.gguf"
    w = gguf.GGUFWriter(path, "qwen3moe")
    w.add_name("big vocabulary")
    w.add_block_count(1)
    w.add_context_length(4096)
    w.add_embedding_length(256)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_expert_count(8)
    w.add_expert_used_count(2)
    w.add_tokenizer_model("gpt2")
    n = 150_000
    w.add_token_list([f"tok{i}_{'x' * (i % 9)}" for i in range(n)])
    w.add_token_types([1] * n)
    w.add_token_merges([f"t{i} o{i % 977}" for i in range(n)])
    w.add_tensor("blk.0.ffn_up_exps.weight", np.zeros((8, 512, 1024), dtype=np.float16))
    w.add_tensor("token_embd.weight", np.zeros((16, 256), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    a = path.read_bytes()
    return a, a[:-1] + bytes([a[-1] ^ 1])  # same header, another file (another sha256)


def test_a_big_header_grows_its_range_and_the_next_quant_reads_in_one_request(fake_hub: FakeHub, big_vocab) -> None:
    a, b = big_vocab
    fake_hub.add_repo("moelocal-test/big", {"big-F16.gguf": a, "big-Q8_0.gguf": b})
    header = parse_header(a).data_offset
    assert 6_000_000 < header < 7_000_000 < len(a)
    pairs = hub.summaries_for_repo("moelocal-test/big")
    assert [s.n_vocab for _, s in pairs] == [150_000, 150_000]
    first = fake_hub.file_requests("moelocal-test/big/big-F16.gguf")
    assert [r.range for r in first] == ["bytes=0-65535", "bytes=65536-1048575", "bytes=1048576-2097151",
                                        "bytes=2097152-4194303", "bytes=4194304-8388607"]
    assert fake_hub.sent["moelocal-test/big/big-F16.gguf"] == 8 << 20  # under twice the header
    second = fake_hub.file_requests("moelocal-test/big/big-Q8_0.gguf")
    assert [r.range for r in second] == [f"bytes=0-{header + hub.HEADER_SLACK - 1}"]
    assert fake_hub.sent["moelocal-test/big/big-Q8_0.gguf"] == header + hub.HEADER_SLACK


def test_summary_for_ref_needs_a_quant_when_there_are_several(fake_hub: FakeHub) -> None:
    assert hub.summary_for_ref(f"{REPO}:f16").quantization == "F16"
    with pytest.raises(HubError) as e:
        hub.summary_for_ref(REPO)
    assert str(e.value) == f"{REPO} has 3 quantizations; name one as {REPO}:QUANT (it has Q4_K, Q8_0, F16)"


def test_headers_of_downloaded_files_are_read_from_the_cache(fake_hub: FakeHub, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    hub.pull(f"{REPO}:Q8_0")
    monkeypatch.setenv("MOELOCAL_HOME", str(tmp_path / "fresh-home"))  # no header cache
    fake_hub.reset_counts()
    assert hub.summary_for_ref(f"{REPO}:Q8_0").quantization == "Q8_0"
    assert [r.path for r in fake_hub.requests] == [f"/api/models/{REPO}"]  # the listing; no range reads


# ---- pull ------------------------------------------------------------------------------------


def test_pull_downloads_into_the_hf_cache_where_other_tools_find_it(fake_hub: FakeHub, repo_files: dict) -> None:
    from huggingface_hub import constants, hf_hub_download

    seen: list[tuple[int, int]] = []
    paths = hub.pull(f"{REPO}:q8_0", progress_callback=lambda done, total: seen.append((done, total)))
    size = len(data(repo_files, Q8))
    assert paths == [snapshot(fake_hub, Q8)]
    assert paths[0].is_symlink() and paths[0].read_bytes() == data(repo_files, Q8)
    assert seen[0] == (0, size) and seen[-1] == (size, size)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    refs_main = Path(constants.HF_HUB_CACHE) / f"models--{REPO.replace('/', '--')}" / "refs" / "main"
    assert refs_main.read_text() == fake_hub.repos[REPO].commit
    assert fake_hub.sent[f"{REPO}/{Q8}"] == size

    fake_hub.reset_counts()
    assert Path(hf_hub_download(REPO, Q8)) == paths[0]  # huggingface_hub takes it as downloaded
    assert cdn_gets(fake_hub) == []
    assert hub.local_model(REPO) == paths[0]
    assert [(m.ref, m.files, m.complete) for m in hub.cached_models()] == [(f"{REPO}:Q8_0", tuple(paths), True)]


def test_pull_fetches_every_shard_of_a_split_set(fake_hub: FakeHub, repo_files: dict) -> None:
    paths = hub.pull(REPO, "F16")
    assert paths == [snapshot(fake_hub, p) for p in SHARDS]
    assert [p.read_bytes() for p in paths] == [data(repo_files, p) for p in SHARDS]
    local = read_summary(paths[0])  # llama.cpp-style: the other shards sit next to the first
    assert local.quantization == "F16" and len(local.files) == 3
    assert hub.local_model(f"{REPO}:F16") == paths[0]


def test_a_dropped_connection_resumes_with_a_range_request(fake_hub: FakeHub, repo_files: dict) -> None:
    content = data(repo_files, Q8)
    fake_hub.drop_after(f"{REPO}/{Q8}", 1_000_000)
    (path,) = hub.pull(f"{REPO}:Q8_0")
    assert sha256(path.read_bytes()) == sha256(content)
    gets = cdn_gets(fake_hub)
    assert len(gets) == 2 and gets[0] == (f"{REPO}/{Q8}", None)
    resumed_at = int(gets[1][1].removeprefix("bytes=").removesuffix("-"))
    assert 0 < resumed_at <= 1_000_000 and resumed_at % CHUNK == 0  # whole chunks written before the drop
    assert fake_hub.sent[f"{REPO}/{Q8}"] == 1_000_000 + len(content) - resumed_at


def test_an_interrupted_pull_leaves_nothing_complete_and_the_next_run_resumes(fake_hub: FakeHub, repo_files: dict
                                                                                ) -> None:
    from huggingface_hub import constants, try_to_load_from_cache

    content = data(repo_files, Q8)

    def ctrl_c(done: int, total: int) -> None:
        if done >= 2 << 20:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        hub.pull(f"{REPO}:Q8_0", progress_callback=ctrl_c)
    blob_dir = Path(constants.HF_HUB_CACHE) / f"models--{REPO.replace('/', '--')}" / "blobs"
    assert [p.name for p in blob_dir.iterdir()] == [sha256(content) + ".incomplete"]
    kept = (blob_dir / (sha256(content) + ".incomplete")).stat().st_size
    assert 0 < kept < len(content)
    assert not snapshot(fake_hub, Q8).exists()
    assert try_to_load_from_cache(REPO, Q8) is None  # other tools do not take it as downloaded
    assert hub.cached_models() == []
    with pytest.raises(HubError, match="is not downloaded yet"):
        hub.local_model(f"{REPO}:Q8_0")
    plan = hub.plan_download(REPO, "Q8_0")
    assert (plan.files[0].cached, plan.files[0].partial, plan.to_download) == (False, kept, len(content) - kept)

    fake_hub.reset_counts()
    (path,) = hub.download(plan)
    assert cdn_gets(fake_hub) == [(f"{REPO}/{Q8}", f"bytes={kept}-")]
    assert fake_hub.sent[f"{REPO}/{Q8}"] == len(content) - kept
    assert sha256(path.read_bytes()) == sha256(content)


def test_a_corrupted_shard_is_caught_and_only_it_is_fetched_again(fake_hub: FakeHub, repo_files: dict) -> None:
    fake_hub.corrupt(f"{REPO}/{SHARDS[1]}")
    totals: list[int] = []
    paths = hub.pull(f"{REPO}:F16", progress_callback=lambda done, total: totals.append(total))
    sizes = [len(data(repo_files, p)) for p in SHARDS]
    assert [fake_hub.sent[f"{REPO}/{p}"] for p in SHARDS] == [sizes[0], 2 * sizes[1], sizes[2]]
    assert totals[0] == sum(sizes) and totals[-1] == sum(sizes) + sizes[1]
    assert [sha256(p.read_bytes()) for p in paths] == [sha256(data(repo_files, p)) for p in SHARDS]


def test_a_shard_that_keeps_failing_is_deleted_and_the_rest_kept(fake_hub: FakeHub, repo_files: dict) -> None:
    from huggingface_hub import constants

    fake_hub.corrupt(f"{REPO}/{SHARDS[1]}", times=2)
    with pytest.raises(DownloadError) as e:
        hub.pull(f"{REPO}:F16")
    assert str(e.value) == (
        f"{SHARDS[1]} does not match its sha256 from the Hub after 2 downloads, so it was deleted (run the command "
        "again; if it keeps failing, the file on the Hub or a proxy on the way is corrupt)"
    )
    blobs = Path(constants.HF_HUB_CACHE) / f"models--{REPO.replace('/', '--')}" / "blobs"
    assert sorted(p.name for p in blobs.iterdir()) == [sha256(data(repo_files, SHARDS[0]))]
    assert snapshot(fake_hub, SHARDS[0]).is_file() and not snapshot(fake_hub, SHARDS[1]).exists()
    assert [(m.quant, m.complete) for m in hub.cached_models()] == [("F16", False)]

    fake_hub.reset_counts()
    hub.pull(f"{REPO}:F16")
    assert dict(fake_hub.sent) == {f"{REPO}/{p}": len(data(repo_files, p)) for p in SHARDS[1:]}


def test_verify_replaces_a_damaged_file_in_the_cache(fake_hub: FakeHub, repo_files: dict) -> None:
    (path,) = hub.pull(f"{REPO}:Q4_K")
    blob = path.resolve()
    damaged = bytearray(blob.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    blob.write_bytes(bytes(damaged))
    fake_hub.reset_counts()
    assert hub.pull(f"{REPO}:Q4_K") == [path]  # same size: taken as downloaded
    assert dict(fake_hub.sent) == {}
    hub.download(hub.plan_download(REPO, "Q4_K"), verify_cached=True)
    assert dict(fake_hub.sent) == {f"{REPO}/{Q4}": len(damaged)}
    assert path.read_bytes() == data(repo_files, Q4)


def test_offline_uses_what_is_cached(fake_hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = hub.pull(f"{REPO}:Q4_K")
    fake_hub.reset_counts()
    offline(monkeypatch)
    assert hub.pull(f"{REPO}:Q4_K") == paths
    with pytest.raises(HubError) as e:
        hub.pull(f"{REPO}:Q8_0")
    assert str(e.value) == (f"1 of the files of {REPO}:Q8_0 are not downloaded and offline mode is on "
                            "(HF_HUB_OFFLINE) (unset HF_HUB_OFFLINE to download them)")
    assert fake_hub.requests == []


def test_a_token_reaches_the_hub_but_never_the_cdn(fake_hub: FakeHub, monkeypatch: pytest.MonkeyPatch,
                                                   repo_files: dict) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_granted")
    assert hub.summary_for_ref(GATED).quantization == "Q8_0"
    (path,) = hub.pull(GATED)
    assert path.read_bytes() == data(repo_files, Q8)
    assert {(r.server, r.auth) for r in fake_hub.requests} == {("hub", True), ("cdn", False)}


# ---- errors ----------------------------------------------------------------------------------


def test_repo_not_found(fake_hub: FakeHub) -> None:
    with pytest.raises(HubError) as e:
        hub.summaries_for_repo("moelocal-test/nope")
    assert str(e.value) == ("moelocal-test/nope was not found on the Hugging Face Hub (check the name; if it is "
                            "private, log in with `hf auth login` or set HF_TOKEN)")


def test_gated_repo(fake_hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(HubError) as e:
        hub.summary_for_ref(GATED)
    assert str(e.value) == (f"{GATED} is a gated repo and needs an access token (accept its terms at "
                            f"{fake_hub.endpoint}/{GATED}, then log in with `hf auth login` or set HF_TOKEN)")
    with pytest.raises(HubError) as e:
        hub.plan_download(GATED)  # before anything is shown or asked
    assert str(e.value).startswith(f"{GATED} is a gated repo and needs an access token (")
    monkeypatch.setenv("HF_TOKEN", "hf_other")
    with pytest.raises(HubError) as e:
        hub.pull(GATED)
    assert str(e.value) == (f"your Hugging Face token has no access to the gated repo {GATED} (accept its terms at "
                            f"{fake_hub.endpoint}/{GATED} with the account of that token)")


def test_no_gguf_files(fake_hub: FakeHub) -> None:
    with pytest.raises(HubError) as e:
        hub.list_quants(EMPTY)
    assert str(e.value) == (f"{EMPTY} has no GGUF model files (moelocal runs llama.cpp GGUF models; look for a GGUF "
                            "repo (often named org/Model-GGUF))")


def test_quantization_not_found(fake_hub: FakeHub) -> None:
    with pytest.raises(HubError) as e:
        hub.plan_download(f"{REPO}:Q5_K_M")
    assert str(e.value) == f"{REPO} has no quantization Q5_K_M (it has Q4_K, Q8_0, F16)"


def test_revision_not_found(fake_hub: FakeHub) -> None:
    with pytest.raises(HubError) as e:
        hub.list_quants(f"{REPO}@no-such-branch")
    assert str(e.value) == f"{REPO} has no revision no-such-branch (check the branch, tag or commit after @)"


def test_network_unreachable(fake_hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setattr(constants, "ENDPOINT", dead)
    with pytest.raises(HubError) as e:
        hub.list_quants(REPO)
    assert str(e.value) == (f"cannot reach the Hugging Face Hub at {dead} (check your network or proxy; to use "
                            "models already downloaded, set HF_HUB_OFFLINE=1)")


def test_offline_and_never_read(fake_hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    offline(monkeypatch)
    with pytest.raises(HubError) as e:
        hub.summaries_for_repo(REPO)
    assert str(e.value) == (f"{REPO} has not been read before and offline mode is on (HF_HUB_OFFLINE) "
                            "(unset HF_HUB_OFFLINE to reach the Hub)")


def test_disk_full(fake_hub: FakeHub, monkeypatch: pytest.MonkeyPatch, repo_files: dict) -> None:
    usage = shutil.disk_usage("/")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1 << 20))
    plan = hub.plan_download(REPO, "Q8_0")
    with pytest.raises(DownloadError) as e:
        hub.download(plan)
    assert str(e.value) == (f"not enough disk space: {REPO}:Q8_0 needs 6.4 MiB more in {plan.cache_dir}, which has "
                            "1.0 MiB free (free some space, or set HF_HUB_CACHE to a folder on a bigger disk)")
    assert cdn_gets(fake_hub) == []


def test_translate_hub_error_leaves_other_errors_alone() -> None:
    assert hub.translate_hub_error(ValueError("x")) is None


# ---- the commands ----------------------------------------------------------------------------


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str]):
    """``run("pull", ...) -> (exit code, stdout, stderr)`` through moelocal.cli.main."""
    registered = {c.name for c in cli.app.registered_commands}
    if "pull" not in registered:
        pull_cmd.register(cli.app)
    if "list" not in registered:
        models_cmd.register(cli.app)

    def _run(*args: str) -> tuple[int, str, str]:
        try:
            cli.main(list(args))
            code = 0
        except SystemExit as exc:
            code = exc.code
        out = capsys.readouterr()
        return code, out.out, out.err

    return _run


def test_cli_pull_dry_run_shows_the_plan_and_downloads_nothing(fake_hub: FakeHub, run) -> None:
    code, out, err = run("pull", f"{REPO}:f16", "--dry-run")
    commit = fake_hub.repos[REPO].commit
    cache = snapshot(fake_hub, "x").parents[2]
    assert (code, out) == (0, "")
    assert err.splitlines()[:4] == [
        f"{REPO}:F16, commit {commit[:12]}",
        f"  {SHARDS[0]}  3.6 MiB",
        f"  {SHARDS[1]}  3.3 MiB",
        f"  {SHARDS[2]}  5.1 MiB",
    ]
    assert err.splitlines()[4].startswith(f"To download: 12.0 MiB into {cache} (")
    assert len(err.splitlines()) == 5
    assert cdn_gets(fake_hub) == []
    code, out, _ = run("pull", REPO, "--quant", "F16", "--dry-run", "--json")
    plan = json.loads(out)
    assert (plan["quant"], plan["to_download"], [f["path"] for f in plan["files"]]) == ("F16", 12634368, SHARDS)


def test_cli_pull_prints_the_paths(fake_hub: FakeHub, run) -> None:
    code, out, err = run("pull", f"{REPO}:Q4_K", "-y")
    assert (code, out) == (0, f"{snapshot(fake_hub, Q4)}\n")
    assert err.splitlines()[-1] == f"Downloaded 3.5 MiB of {REPO}:Q4_K; sha256 checked."
    code, out, err = run("pull", f"{REPO}:Q4_K")  # nothing to download: nothing to ask
    assert (code, out) == (0, f"{snapshot(fake_hub, Q4)}\n")
    assert err.splitlines()[-1] == f"Already downloaded, in {snapshot(fake_hub, 'x').parents[2]}"


def test_cli_pull_asks_and_will_not_ask_a_pipe(fake_hub: FakeHub, run) -> None:
    code, out, err = run("pull", f"{REPO}:Q4_K")
    assert (code, out) == (2, "")
    assert err.splitlines()[-1] == ("Error: not asking whether to download 3.5 MiB: the input is not a terminal "
                                    "(add -y to download without asking)")
    assert cdn_gets(fake_hub) == []


def test_cli_pull_takes_fits_recommendation(fake_hub: FakeHub, run) -> None:
    pytest.importorskip("moelocal.memory")  # the planner's memory model (being written) prices the plans
    code, out, err = run("pull", REPO, "--dry-run")
    assert code == 0, err
    # the tiny test model fits anywhere in every quantization: the one with the most bits wins
    assert err.splitlines()[0] == (f"{REPO}:F16 (fit's recommendation for this machine), "
                                   f"commit {fake_hub.repos[REPO].commit[:12]}")


def test_pull_passes_every_quantization_to_the_planner(fake_hub: FakeHub, run,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from moelocal import planner

    seen = []

    def recommend(summaries, hw, options, ctx_requested=True):  # stands in until the memory model lands
        seen.append(([s.quantization for s in summaries], options.n_ctx, ctx_requested))
        return choice

    monkeypatch.setattr(planner, "recommend_quant", recommend)
    choice = 1
    code, out, err = run("pull", REPO, "--dry-run")
    assert (code, err.splitlines()[0]) == (0, f"{REPO}:Q8_0 (fit's recommendation for this machine), "
                                              f"commit {fake_hub.repos[REPO].commit[:12]}")
    assert seen == [(["Q4_K", "Q8_0", "F16"], 4096, False)]
    choice = None
    code, out, err = run("pull", REPO, "-y")
    assert (code, err) == (3, f"Error: no quantization of {REPO} fits this machine (see `moelocal fit {REPO}`, or "
                              "choose one with --quant)\n")
    assert {r for _, r in cdn_gets(fake_hub)} == {"bytes=0-65535"}  # headers only, nothing downloaded


def test_cli_fit_on_a_repo_reads_headers_only(fake_hub: FakeHub, run, repo_files: dict) -> None:
    pytest.importorskip("moelocal.memory")
    code, out, err = run("fit", REPO, "--json")
    assert code == 0, err
    assert len(json.loads(out)["models"]) == 3
    assert set(fake_hub.sent.values()) == {hub.FIRST_READ}  # five GGUF files, one header read each
    fake_hub.reset_counts()
    assert run("fit", f"{REPO}:Q8_0", "--json")[0] == 0
    assert fake_hub.requests == []
    code, out, _ = run("fit", f"{REPO}:Q8_0", "--no-gpu", "--ram", "8GiB", "--ctx", "1024")
    assert code == 0  # not downloaded: the llama.cpp command names the repo, not a path
    assert f"llama.cpp: llama-server -hf {REPO}:Q8_0 -ngl 0 -c 1024 -fa on" in out


def test_cli_pull_of_a_repo_with_one_quantization_needs_no_choice(fake_hub: FakeHub, run,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_granted")
    code, out, err = run("pull", GATED, "-y", "--json")
    result = json.loads(out)
    assert (code, result["quant"], result["recommended"]) == (0, "Q8_0", False)
    assert [Path(p).read_bytes()[:4] for p in result["paths"]] == [b"GGUF"]
    assert err.splitlines()[0] == f"{GATED}:Q8_0, commit {fake_hub.repos[GATED].commit[:12]}"


def test_cli_pull_errors(fake_hub: FakeHub, run) -> None:
    code, out, err = run("pull", "moelocal-test/nope", "-y")
    assert (code, out, err) == (4, "", "Error: moelocal-test/nope was not found on the Hugging Face Hub (check the "
                                "name; if it is private, log in with `hf auth login` or set HF_TOKEN)\n")
    code, out, err = run("pull", f"{REPO}:Q4_K", "--quant", "Q8_0")
    assert (code, err) == (2, f"Error: {REPO}:Q4_K names Q4_K but --quant says Q8_0 (give the quantization once)\n")


def test_cli_list_and_rm(fake_hub: FakeHub, run) -> None:
    code, out, err = run("list")
    assert (code, out) == (0, "")
    assert err.startswith("No GGUF models in the Hugging Face cache (")
    hub.pull(f"{REPO}:Q4_K")
    hub.pull(f"{REPO}:F16")
    code, out, err = run("list")
    assert (code, err) == (0, "")
    rows = [line.split("\t") for line in out.splitlines()]
    assert [r[:3] + r[4:] for r in rows] == [
        [f"{REPO}:Q4_K", "3.5 MiB", "1", str(snapshot(fake_hub, Q4))],
        [f"{REPO}:F16", "12.0 MiB", "3", str(snapshot(fake_hub, SHARDS[0]))],
    ]
    for r in rows:  # whether it fits this machine, as `fit` says: these tiny models always do
        assert r[3].startswith("fits, ") and r[3].endswith(" tok/s") and float(r[3][6:-6]) > 0
    code, out, _ = run("list", "--json")
    assert [(m["quant"], m["complete"], len(m["files"]), m["fits"]) for m in json.loads(out)] == [
        ("Q4_K", True, 1, True), ("F16", True, 3, True)]
    code, out, _ = run("list", "--json", "--ram", "1MiB")
    assert [(m["fits"], m["verdict"]) for m in json.loads(out)] == [(False, "does not fit")] * 2

    code, out, err = run("rm", f"{REPO}:f16")
    assert (code, err.splitlines()[-1]) == (2, "Error: not asking whether to delete: the input is not a terminal "
                                               "(add -y to delete without asking)")
    code, out, err = run("rm", f"{REPO}:f16", "-y")
    assert (code, out) == (0, "")
    assert err.splitlines() == [f"To delete: {REPO}:F16, 3 files, freeing 12.0 MiB",
                                *[f"  {snapshot(fake_hub, p)}" for p in SHARDS], f"Deleted {REPO}:F16."]
    assert [m.ref for m in hub.cached_models()] == [f"{REPO}:Q4_K"]
    assert snapshot(fake_hub, Q4).read_bytes()[:4] == b"GGUF"

    code, out, err = run("rm", f"{REPO}:Q8_0", "-y")
    assert (code, err) == (2, f"Error: {REPO} has no quantization Q8_0 in the cache (it has Q4_K)\n")
    code, out, err = run("rm", REPO, "-y")
    assert code == 0 and err.splitlines()[-1] == f"Deleted {REPO}."
    assert hub.cached_models() == []
    assert not snapshot(fake_hub, "x").parents[2].exists()
    code, out, err = run("rm", REPO, "-y")
    assert (code, err) == (2, f"Error: {REPO} is not in the Hugging Face cache ({hub.hf_cache_dir()}) (see what is "
                              "there with `moelocal list`)\n")


def test_rm_errors_are_model_file_errors(fake_hub: FakeHub) -> None:
    with pytest.raises(ModelFileError):
        hub.plan_removal(REPO)


def test_run_commands_take_a_pulled_hub_model_and_say_how_to_pull_a_missing_one(
    fake_hub: FakeHub, repo_files: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    ref = f"{REPO}:Q8_0"
    with pytest.raises(SystemExit) as missing:  # not downloaded, and stdin is no terminal to ask on
        cli.main(["generate", ref, "-p", "Hello", "-n", "4", "--temp", "0"])
    assert missing.value.code == 4
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"Error: {ref} is not downloaded yet (download it first with `moelocal pull {ref}`)"
    )
    hub.pull(REPO, "Q8_0")
    cli.main(["generate", ref, "-p", "Hello", "-n", "4", "--temp", "0", "--json"])
    record = json.loads(capsys.readouterr().out)
    assert record["completion_tokens"] == 4 and record["prompt_tokens"] > 1
