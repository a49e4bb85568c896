"""Shared fixtures: the small GGUF test models, written once per session, and a safe llama.cpp loader."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from moelocal import testmodels


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """moelocal's own state goes to a fresh folder, never the user's."""
    monkeypatch.setenv("MOELOCAL_HOME", str(tmp_path_factory.mktemp("moelocal-home")))


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder the session's test models are written into."""
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def models(model_dir: Path) -> dict[str, Path]:
    """name -> path of every test architecture in every type of testmodels.DEFAULT_QUANTS:
    ``models["qwen3moe-q4_k"]``."""
    return testmodels.build_all(model_dir)


@pytest.fixture(scope="session")
def split_model(model_dir: Path) -> Path:
    """qwen3moe in F16 as a split set of 3 shards; the path of the first shard."""
    return testmodels.write_model("qwen3moe", model_dir / "split" / "qwen3moe-f16.gguf", n_split=3)


@pytest.fixture(scope="session")
def load_llama() -> Callable[..., object]:
    """``with load_llama(path) as m:`` loads a model through llama.cpp's low-level API on the CPU.

    It turns ``use_extra_bufts`` off (the AMX trap: quantized weights in the AMX buffer type crash on
    batches of two tokens or more) and frees model and context on exit. ``m`` has ``.model``, ``.ctx``,
    ``.tokenize()``, ``.decode()`` and ``.generate()``; see moelocal.testmodels.Loaded.
    """
    return testmodels.load


@pytest.fixture(scope="session")
def llama_assets() -> Path:
    """The vendored llama.cpp's ``models/`` (real chat templates in ``models/templates``, vocab-only
    GGUFs of real tokenizers) and ``src/`` (its architecture list), taken from the llama-cpp-python
    sdist by ``scripts/install.sh --dev`` into the virtual environment."""
    root = Path(sys.prefix) / "share" / "llama.cpp"
    if not (root / ".complete").is_file():
        pytest.fail(f"{root} is missing: run scripts/install.sh {sys.prefix} --dev (make test does)")
    return root


@pytest.fixture(scope="session")
def scripted_models(model_dir: Path, llama_assets: Path) -> dict[str, Path]:
    """"qwen3" and "gpt-oss" -> a scripted model (moelocal.scripted): greedy decoding says that family's
    scripts (plain answer, tool call, answer to a tool result) with the real tokenizer and template."""
    from moelocal import scripted

    out = {}
    for name in scripted.FAMILIES:
        path = model_dir / f"scripted-{name}.gguf"
        out[name] = path if path.is_file() else scripted.write_scripted(name, llama_assets / "models", path)
    return out
