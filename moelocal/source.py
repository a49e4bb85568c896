"""Model references: a local file, the bundled demo model, or (see hub.py) a Hugging Face repo."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from moelocal.errors import ModelFileError

DEMO_NAME = "moelocal-demo.gguf"


def demo_model_path() -> Path:
    """The small MoE model shipped inside the package."""
    path = Path(str(resources.files("moelocal") / "data" / DEMO_NAME))
    if not path.is_file():
        raise ModelFileError(
            "the bundled demo model is missing from this installation",
            "reinstall moelocal, or give a model: a .gguf path or org/repo",
        )
    return path


@dataclass(frozen=True)
class ModelRef:
    """What the user named: ``path`` for a local file, else ``repo`` (+ ``quant``, ``revision``)."""

    text: str
    path: Path | None = None
    repo: str | None = None
    quant: str | None = None
    revision: str | None = None
    is_demo: bool = False


def parse_ref(text: str | None) -> ModelRef:
    """Tell a local path from a Hub reference (``org/repo[:QUANT][@REV]``)."""
    if text is None:
        return ModelRef(text=DEMO_NAME, path=demo_model_path(), is_demo=True)
    path = Path(text).expanduser()
    if path.exists() or text.endswith(".gguf") or text.startswith((".", "/", "~")) or text.count("/") != 1:
        return ModelRef(text=text, path=path)
    repo, revision = text, None
    if "@" in repo:
        repo, revision = repo.split("@", 1)
    quant = None
    if ":" in repo:
        repo, quant = repo.split(":", 1)
    return ModelRef(text=text, repo=repo, quant=quant or None, revision=revision or None)
