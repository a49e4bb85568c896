"""The bundled demo model: a real MoE that llama.cpp loads and that speaks English.

Each check would fail for a model with random weights: held-out perplexity near the vocabulary size,
replies of punctuation or one repeated word.
"""

from __future__ import annotations

import ctypes
import functools
import math
import re
from collections.abc import Iterator

import numpy as np
import pytest

from moelocal.gguf_model import read_summary
from moelocal.source import demo_model_path, parse_ref

llama_cpp = pytest.importorskip("llama_cpp")

# Two paragraphs from the held-out end of "Pride and Prejudice" and "Emma" (scripts/demo_corpus.py keeps
# the last 4% of every novel out of training).
HELD_OUT = (
    '"Well, my dear," said he, when she ceased speaking, "I have no more to say. If this be the case, he '
    'deserves you. I could not have parted with you, my Lizzy, to anyone less worthy."\n'
    '"Is not she looking well?" said he, turning his eyes towards Jane. "Better than she ever used to do?--'
    'You see how my father and Mrs. Weston doat upon her."'
)
# Common English words (beyond the model's whole-word tokens) that replies may use.
EXTRA_WORDS = {"i", "a", "s", "t", "d", "ll", "ve", "re", "m", "mr", "mrs", "st", "dr"}


class Demo:
    """The shipped GGUF loaded through llama.cpp's low-level API, with use_extra_bufts off: this
    machine's AMX buffer type crashes on batches of quantized weights (see engine.extra_bufts_default)."""

    def __init__(self, path: str) -> None:
        lc = llama_cpp
        lc.llama_backend_init()
        mp = lc.llama_model_default_params()
        mp.use_extra_bufts = False
        self.model = lc.llama_model_load_from_file(path.encode(), mp)
        assert self.model, "llama.cpp could not load the demo model"
        self.vocab = lc.llama_model_get_vocab(self.model)
        self.n_vocab = lc.llama_vocab_n_tokens(self.vocab)
        cp = lc.llama_context_default_params()
        cp.n_ctx = cp.n_batch = cp.n_ubatch = 512
        cp.n_threads = cp.n_threads_batch = 2
        self.ctx = lc.llama_init_from_model(self.model, cp)
        assert self.ctx

    def close(self) -> None:
        llama_cpp.llama_free(self.ctx)
        llama_cpp.llama_model_free(self.model)

    def meta(self, key: str) -> str:
        buf = ctypes.create_string_buffer(4096)
        n = llama_cpp.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        return buf.value.decode() if n >= 0 else ""

    def tokenize(self, text: str) -> list[int]:
        raw = text.encode()
        buf = (llama_cpp.llama_token * (len(raw) + 8))()
        n = llama_cpp.llama_tokenize(self.vocab, raw, len(raw), buf, len(buf), False, True)
        return list(buf[:n])

    def piece(self, token: int) -> str:
        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        return buf.raw[:n].decode("utf-8", errors="replace")

    def logits(self, ids: list[int], start: int = 0) -> np.ndarray:
        """Logits after each token of ``ids``, placed at positions start, start+1, ..."""
        lc = llama_cpp
        if start == 0:
            lc.llama_memory_clear(lc.llama_get_memory(self.ctx), True)
        batch = lc.llama_batch_init(len(ids), 0, 1)
        try:
            for i, t in enumerate(ids):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = t, start + i, 1, True
                batch.seq_id[i][0] = 0
            batch.n_tokens = len(ids)
            assert lc.llama_decode(self.ctx, batch) == 0
            return np.ctypeslib.as_array(lc.llama_get_logits(self.ctx), shape=(len(ids), self.n_vocab)).copy()
        finally:
            lc.llama_batch_free(batch)

    def greedy_reply(self, user: str, max_tokens: int = 48) -> str:
        prompt = f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
        ids = self.tokenize(prompt)
        eos = llama_cpp.llama_vocab_eos(self.vocab)
        last, pos, out = self.logits(ids)[-1], len(ids), []
        for _ in range(max_tokens):
            tok = int(np.argmax(last))
            if tok == eos:
                break
            out.append(tok)
            last = self.logits([tok], start=pos)[-1]
            pos += 1
        return "".join(self.piece(t) for t in out)

    @functools.cached_property
    def vocab_words(self) -> set[str]:
        """Whole English words that are single tokens of the model ("Ġwindow" -> "window")."""
        words = set()
        for t in range(self.n_vocab):
            text = self.piece(t).strip()
            if text.isalpha() and text.isascii():
                words.add(text.lower())
        return words


@pytest.fixture(scope="module")
def demo() -> Iterator[Demo]:
    model = Demo(str(demo_model_path()))
    yield model
    model.close()


def test_demo_is_the_default_model() -> None:
    ref = parse_ref(None)
    assert ref.is_demo and ref.path == demo_model_path()
    assert ref.path.name == "moelocal-demo.gguf"


def test_demo_is_a_small_qwen3_moe() -> None:
    s = read_summary(demo_model_path())
    assert s.architecture == "qwen3moe"
    assert s.is_moe
    assert (s.n_expert, s.n_expert_used) == (8, 2)
    assert s.moe_layers == tuple(range(s.n_layer)) and s.n_layer == 4
    assert (s.n_embd, s.n_vocab, s.context_length, s.expert_ff) == (192, 4096, 512, 256)
    assert s.params_active < s.params_total < 8_000_000
    assert s.quantization == "Q8_0"
    assert s.file_size < 8_000_000
    assert "<|im_start|>" in s.metadata["tokenizer.chat_template"]


def test_llama_cpp_sees_top2_of_8_experts(demo: Demo) -> None:
    assert demo.meta("general.architecture") == "qwen3moe"
    n_expert, n_used = int(demo.meta("qwen3moe.expert_count")), int(demo.meta("qwen3moe.expert_used_count"))
    assert n_expert == 8 and 2 <= n_used < n_expert
    assert demo.n_vocab == 4096
    assert demo.tokenize("<|im_end|>") == [llama_cpp.llama_vocab_eos(demo.vocab)]


def test_held_out_perplexity_is_far_below_chance(demo: Demo) -> None:
    ids = demo.tokenize(HELD_OUT)
    logits = demo.logits(ids)[:-1].astype(np.float64)
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    ppl = math.exp(-logp[np.arange(len(ids) - 1), ids[1:]].mean())
    # Chance is 4096 and the unigram baseline about 650 on this corpus; the trained model is far lower.
    assert ppl < 40, ppl


@pytest.mark.parametrize("prompt", ["Tell me a story.", "Hello! How are you today?", "What do you think of Mr. Darcy?"])
def test_greedy_replies_are_english(demo: Demo, prompt: str) -> None:
    reply = demo.greedy_reply(prompt)
    words = [w.lower() for w in re.findall(r"[A-Za-z]+", reply)]
    known = demo.vocab_words | EXTRA_WORDS
    assert len(words) >= 8, reply
    assert sum(w in known for w in words) / len(words) >= 0.85, reply
    assert len(set(words)) >= 6, reply  # not one word over and over
    assert "<|im" not in reply
