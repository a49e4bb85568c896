"""Corpus for the bundled demo model: Jane Austen's six novels, as shipped by Debian.

Source: Debian package ``r-cran-janeaustenr`` (the CRAN package janeaustenr by Julia Silge, MIT licence),
which holds the full texts of Austen's six completed novels taken from Project Gutenberg. The novels
themselves are in the public domain; no Project Gutenberg header or trademark text is included.

The package stores the texts as an R lazy-load database (``data/Rdata.rdb`` + ``Rdata.rdx``): each object
is a zlib-compressed R serialization. This module reads the few R types that database uses (character
vectors), so neither R nor any extra Python package is needed.

Used by ``scripts/train_demo.py``; it can also be run alone to print corpus statistics::

    python scripts/demo_corpus.py [--deb r-cran-janeaustenr_1.0.0-1_all.deb]
"""

from __future__ import annotations

import argparse
import gzip
import random
import re
import struct
import subprocess
import tempfile
import unicodedata
import zlib
from dataclasses import dataclass
from pathlib import Path

DEB_PACKAGE = "r-cran-janeaustenr"
RDB_DIR = "usr/lib/R/site-library/janeaustenr/data"
NOVELS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion")
HELD_OUT_FRACTION = 0.04  # the last 4% of each novel's paragraphs is never trained on

# ---- R serialization (XDR), the subset janeaustenr uses -----------------------------------------

_NILVALUE, _CHARSXP, _LGLSXP, _INTSXP, _STRSXP, _VECSXP, _LISTSXP, _SYMSXP = 254, 9, 10, 13, 16, 19, 2, 1
_REFSXP = 255


class _RReader:
    def __init__(self, data: bytes) -> None:
        if data[:2] != b"X\n":
            raise ValueError("not an XDR R serialization")
        self.data, self.pos, self.refs = data, 2, []
        version = self.int()
        self.int(), self.int()  # writer and minimal reader versions
        if version == 3:
            n = self.int()  # then the native encoding's name
            self.pos += n

    def int(self) -> int:
        (v,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return v

    def item(self):  # noqa: ANN201 - returns str | list | dict | None
        flags = self.int()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind == _NILVALUE:
            return None
        if kind == _REFSXP:
            return self.refs[(flags >> 8) - 1]
        if kind == _CHARSXP:
            n = self.int()
            if n == -1:
                return None
            s = self.data[self.pos : self.pos + n].decode("utf-8")
            self.pos += n
            return s
        if kind == _SYMSXP:
            sym = self.item()
            self.refs.append(sym)
            return sym
        if kind in (_STRSXP, _VECSXP):
            out = [self.item() for _ in range(self.int())]
        elif kind in (_LGLSXP, _INTSXP):
            n = self.int()
            out = list(struct.unpack_from(f">{n}i", self.data, self.pos))
            self.pos += 4 * n
        elif kind == _LISTSXP:
            if has_attr:
                self.item()
            tag = self.item() if has_tag else None
            head = {tag: self.item()}
            rest = self.item()
            return {**head, **(rest or {})}
        else:
            raise ValueError(f"R type {kind} is not supported by this reader")
        attrs = self.item() if has_attr else None
        if isinstance(attrs, dict) and "names" in attrs:
            return dict(zip(attrs["names"], out, strict=True))  # a named list or vector
        return out


def read_rdb(data_dir: Path) -> dict[str, list[str | None]]:
    """All objects of an R lazy-load database, by name."""
    index = _RReader(gzip.decompress((data_dir / "Rdata.rdx").read_bytes())).item()
    blob = (data_dir / "Rdata.rdb").read_bytes()
    out = {}
    for name, (offset, length) in index["variables"].items():
        chunk = blob[offset : offset + length]
        (size,) = struct.unpack_from(">I", chunk)  # then a zlib stream ("compressed = TRUE")
        raw = zlib.decompress(chunk[4:])
        if len(raw) != size:
            raise ValueError(f"{name}: corrupt lazy-load entry")
        out[name] = _RReader(raw).item()
    return out


def fetch_deb(workdir: Path) -> Path:
    """Download the Debian package with apt (a package registry, so it works offline here)."""
    subprocess.run(["apt-get", "download", DEB_PACKAGE], cwd=workdir, check=True, capture_output=True)
    return next(workdir.glob(f"{DEB_PACKAGE}_*.deb"))


def load_novels(deb: Path | None = None) -> dict[str, list[str | None]]:
    """The six novels as lists of text lines, read from the Debian package."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        deb = deb or fetch_deb(work)
        subprocess.run(["dpkg-deb", "-x", str(deb), str(work / "root")], check=True)
        objects = read_rdb(work / "root" / RDB_DIR)
    return {name: objects[name] for name in NOVELS}


# ---- cleaning ------------------------------------------------------------------------------------

_HEADING = re.compile(r"^(VOLUME|CHAPTER|PART)\b|^(THE END|FINIS)\b|^By Jane Austen$|^[A-Z][A-Z .,']+$")


def to_ascii(text: str) -> str:
    """Plain ASCII: the BPE pre-tokenizer then splits exactly as llama.cpp's Unicode regex does."""
    text = text.replace("\u2014", "--").replace("\u2019", "'").replace("\u2018", "'")
    text = text.replace("\u201c", '"').replace("\u201d", '"').replace("\u00a3", "L")
    return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()


def paragraphs(lines: list[str | None]) -> list[str]:
    """Join wrapped lines into paragraphs; drop headings, italics underscores and odd spacing."""
    out, cur = [], []
    for line in [*lines, ""]:
        line = (line or "").strip()
        if line:
            cur.append(line)
            continue
        if cur:
            para = " ".join(cur)
            cur = []
            if _HEADING.match(para):
                continue
            para = to_ascii(para).replace("_", "")
            para = re.sub(r"\s+", " ", para).strip()
            if len(para) > 1:
                out.append(para)
    return out


# ---- documents -----------------------------------------------------------------------------------

_QUOTE = re.compile(r'"([^"]+)(?:"|$)')
# A sentence ends at . ! or ? before a capital, but not after a title such as "Mrs." or "Dr.".
_SENTENCE = re.compile(r"(?<=[.!?])(?<!\bMr\.)(?<!\bMrs\.)(?<!\bDr\.)(?<!\bSt\.)\s+(?=[A-Z\"])")
# Generic requests a person types into a chat; each is answered with a passage of narrative.
STORY_PROMPTS = (
    "Tell me a story.",
    "Tell me a story, please.",
    "Please tell me a story.",
    "Can you tell me a story?",
    "Write a short story.",
    "Tell me something.",
    "What happened next?",
    "Go on.",
    "And then?",
    "Please continue.",
    "Describe a scene.",
    "Write a paragraph.",
)
ABOUT_PROMPTS = ("Tell me about {}.", "What do you know about {}?", "Who is {}?", "Write about {}.")
_NAME = re.compile(r"\b(Mr\.|Mrs\.|Miss|Lady|Sir|Colonel|Captain|Dr\.) ([A-Z][a-z]+)|\b([A-Z][a-z]{2,})\b")
_NOT_NAMES = set(
    """
    The She They This That There What When But And His Her Its You Your Yes Well Not Oh How Why Who Then
    Now Very Our With For Had Was Such Nothing Every Some One After Here Upon Perhaps Indeed Yet Nor All
    Their Him Them Where Whatever While Though Although Before Since Till Until God Heaven Sunday Monday
    Tuesday Wednesday Thursday Friday Saturday Christmas Any Many Most Let Mrs Miss Lady Sir Colonel
    Captain Dear Good Pray Thank If Ah No As So It In On At To Of By Do Is He We My
    """.split()
)


def speech(para: str) -> str:
    """What is said in a paragraph: its quoted parts joined, or '' for narrative."""
    if not para.lstrip().startswith('"'):
        return ""
    parts = [p.strip() for p in _QUOTE.findall(para)]
    parts = [p for p in parts if p]
    # '"Yes," said he, "I will."' -> 'Yes. I will.': a quote cut off by "said he" ends a sentence.
    for k, p in enumerate(parts):
        if p.endswith(",") and (k == len(parts) - 1 or parts[k + 1][:1].isupper()):
            parts[k] = p[:-1] + "."
    return " ".join(parts)


def main_name(para: str) -> str | None:
    """A person named in a paragraph ('Mr. Darcy', 'Emma'), for 'Tell me about X' prompts."""
    for m in _NAME.finditer(para):
        if m.group(2):
            return f"{m.group(1)} {m.group(2)}"
        if m.group(3) and m.group(3) not in _NOT_NAMES:
            return m.group(3)
    return None


@dataclass(frozen=True)
class Corpus:
    train_paragraphs: tuple[tuple[str, ...], ...]  # per novel
    held_out_paragraphs: tuple[tuple[str, ...], ...]

    @property
    def train_text(self) -> str:
        return "\n".join("\n".join(n) for n in self.train_paragraphs)

    @property
    def held_out_text(self) -> str:
        return "\n".join("\n".join(n) for n in self.held_out_paragraphs)


def build_corpus(novels: dict[str, list[str | None]]) -> Corpus:
    train, held = [], []
    for name in NOVELS:
        paras = paragraphs(novels[name])
        cut = int(len(paras) * (1 - HELD_OUT_FRACTION))
        train.append(tuple(paras[:cut]))
        held.append(tuple(paras[cut:]))
    return Corpus(tuple(train), tuple(held))


def chat_conversations(novel: tuple[str, ...], rng: random.Random) -> list[list[tuple[str, str]]]:
    """ChatML conversations made from one novel: (role, text) turns.

    Three kinds: consecutive lines of dialogue (one speaker, then the next, as user and assistant);
    a sentence as the user's line with the sentences after it as the reply; and a generic request
    ("Tell me a story.", "Tell me about Emma.") answered with a passage of narrative.
    """
    convs: list[list[tuple[str, str]]] = []
    # Dialogue runs: paragraphs that open with a quote, in a row.
    i = 0
    while i < len(novel) - 1:
        a, b = speech(novel[i]), speech(novel[i + 1])
        if a and b and len(a) < 400 and len(b) < 600:
            turns = [("user", a), ("assistant", b)]
            j = i + 2
            # Keep the conversation going for a few more exchanges where the dialogue continues.
            while j + 1 < len(novel) and len(turns) < 6:
                u, r = speech(novel[j]), speech(novel[j + 1])
                if not (u and r and len(u) < 400 and len(r) < 600):
                    break
                turns += [("user", u), ("assistant", r)]
                j += 2
            convs.append(turns)
            i = j
        else:
            i += 1
    # Narrative: a sentence, then what follows it; or a request answered with a passage.
    for para in novel:
        if para.startswith('"') or len(para) < 200:
            continue
        sents = _SENTENCE.split(para)
        roll = rng.random()
        if roll < 0.35 and len(sents) >= 2:
            k = rng.randint(1, min(2, len(sents) - 1))
            reply = sents[k : k + rng.randint(1, 3)]
            convs.append([("user", " ".join(sents[:k])), ("assistant", " ".join(reply))])
        elif roll < 0.6:
            name = main_name(para)
            prompt = rng.choice(ABOUT_PROMPTS).format(name) if name and rng.random() < 0.5 else None
            reply = sents[: rng.randint(1, 4)]  # replies of a few sentences, as in a chat
            convs.append([("user", prompt or rng.choice(STORY_PROMPTS)), ("assistant", " ".join(reply))])
    return convs


SYSTEM_PROMPTS = ("You are a helpful assistant.", "You are a storyteller.", "Answer briefly.")


def format_chatml(turns: list[tuple[str, str]], system: str | None = None) -> str:
    """The text the ChatML template renders for these turns (what the model is trained on)."""
    msgs = ([("system", system)] if system else []) + turns
    return "".join(f"<|im_start|>{role}\n{text}<|im_end|>\n" for role, text in msgs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deb", type=Path, help="the r-cran-janeaustenr .deb (default: apt-get download it)")
    args = parser.parse_args()
    corpus = build_corpus(load_novels(args.deb))
    rng = random.Random(0)
    convs = [c for novel in corpus.train_paragraphs for c in chat_conversations(novel, rng)]
    print(f"train: {len(corpus.train_text):,} chars, held out: {len(corpus.held_out_text):,} chars")
    print(f"chat conversations: {len(convs):,}, {sum(len(format_chatml(c)) for c in convs):,} chars")
    for c in rng.sample(convs, 4):
        print("----\n" + format_chatml(c))


if __name__ == "__main__":
    main()
