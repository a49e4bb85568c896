"""Scripted test models: tiny MoE GGUFs whose greedy output is a script chosen in advance, with a
real tokenizer and a real chat template, so that chat, generate, batch and serve see byte for byte
what a real Qwen3 or gpt-oss would send (reasoning, tool calls, the answer after a tool result).

A random-weight model says nothing useful about formats; this one says exactly what it is told.
The model is a two-layer GLM-4.5-style MoE (glm4moe: a dense first layer, then routed and shared
experts) in which every FFN's output projection is zero, so the residual stream only carries
what the embedding and four designed attention heads put there:

- the current token: a one-hot "slot" per token the scripts use (one shared slot for all others);
- the previous token and the one before it: two heads whose constant queries and keys, rotated by
  RoPE, score highest at distance 1 (or 2), copy that token's random code into their own dims;
- two markers: heads that attend only to a marker token (Qwen3's ``<tool_call>``, seen when tools
  are offered, and ``<tool_response>``, seen once a tool has answered), raising a flag if one is
  anywhere in the context.

The output head is then fitted (a margin perceptron over these exact features, in numpy) so that
each (token, previous, one before, flags) of a script maps to the script's next token. Flags pick
the script: no tools → a plain answer; tools → a tool call; a tool result → the answer to it. The
prompt's own last tokens start the script, whatever they are.

Tokenizers are llama.cpp's vocab-only GGUFs (``models/ggml-vocab-*.gguf`` of the vendored
llama.cpp), with the special tokens the real model adds; templates are the real ones of
``models/templates``. gguf and numpy are imported when a model is written.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

# token types as gguf writes them
_NORMAL, _CONTROL, _USER_DEFINED = 1, 3, 4

# glm4moe as the scripted models use it: 4 heads of 64 (RoPE on the first 32 dims of each), two layers
N_EMBD = 192
N_HEAD = 4
HEAD_DIM = 64
ROPE_DIM = 32
ROPE_BASE = 2.0  # fast rotations: the previous-token heads' scores peak sharply (see _prev_head_keys)
CODE_DIM = 32  # the previous tokens' codes
# residual stream layout: flags, marker bits, the two previous-token codes, then the slots
C_TOOLS, C_RESULT, M_TOOLS, M_RESULT = 0, 1, 2, 3
PREV1 = 4
PREV2 = PREV1 + CODE_DIM
SLOTS = PREV2 + CODE_DIM
MARGIN = 6.0  # logits: the script's next token beats every other by at least this much
SCORE = 40.0  # attention score of a marker, and the least gap of a previous-token head


@dataclass(frozen=True)
class Script:
    """What the model answers, as text (special tokens written as their text), and the token that ends it."""

    text: str
    end: str


@dataclass(frozen=True)
class Family:
    """A scripted model: a real vocabulary (with the tokens the real model adds), a real template, and
    three scripts: ``plain`` (no tools in the prompt), ``call`` (tools offered) and ``answer`` (after a
    tool result). ``tools_marker`` / ``result_marker`` are the tokens whose presence selects them;
    ``avoid`` are tokens that end generation prompts, never used inside a script."""

    name: str
    vocab: str  # ggml-vocab-NAME.gguf
    template: str  # models/templates/NAME.jinja
    plain: Script
    call: Script
    answer: Script
    tools_marker: str
    result_marker: str
    avoid: tuple[str, ...]
    tail: tuple[str, ...]  # the last tokens of the generation prompt, as text
    eos: str
    bos: str
    set_tokens: tuple[tuple[int, str, int], ...] = ()  # (id, text, type): replace padding tokens
    add_tokens: tuple[tuple[str, int], ...] = ()  # (text, type): appended
    pre: str | None = None  # tokenizer.ggml.pre, if not the vocabulary's own

    def scripts(self) -> dict[str, Script]:
        return {"plain": self.plain, "call": self.call, "answer": self.answer}


_QWEN3_ADDED = (  # Qwen3's added tokens, at their real ids (the vocab-only GGUF pads them)
    (151646, "<|object_ref_start|>", _CONTROL), (151647, "<|object_ref_end|>", _CONTROL),
    (151648, "<|box_start|>", _CONTROL), (151649, "<|box_end|>", _CONTROL), (151650, "<|quad_start|>", _CONTROL),
    (151651, "<|quad_end|>", _CONTROL), (151652, "<|vision_start|>", _CONTROL), (151653, "<|vision_end|>", _CONTROL),
    (151654, "<|vision_pad|>", _CONTROL), (151655, "<|image_pad|>", _CONTROL), (151656, "<|video_pad|>", _CONTROL),
    (151657, "<tool_call>", _USER_DEFINED), (151658, "</tool_call>", _USER_DEFINED),
    (151659, "<|fim_prefix|>", _USER_DEFINED), (151660, "<|fim_middle|>", _USER_DEFINED),
    (151661, "<|fim_suffix|>", _USER_DEFINED), (151662, "<|fim_pad|>", _USER_DEFINED),
    (151663, "<|repo_name|>", _USER_DEFINED), (151664, "<|file_sep|>", _USER_DEFINED),
    (151665, "<tool_response>", _USER_DEFINED), (151666, "</tool_response>", _USER_DEFINED),
    (151667, "<think>", _USER_DEFINED), (151668, "</think>", _USER_DEFINED),
)
# gpt-oss's o200k_harmony special tokens, in their real order (appended to a real BPE vocabulary)
_HARMONY_ADDED = tuple((t, _CONTROL) for t in ("<|startoftext|>", "<|endoftext|>", "<|return|>", "<|constrain|>",
                                               "<|channel|>", "<|start|>", "<|end|>", "<|message|>", "<|call|>"))

QWEN3 = Family(
    name="qwen3",
    vocab="qwen2",
    template="Qwen-Qwen3-0.6B",
    plain=Script("<think>\nThe user greets me. I will greet them back.\n</think>\n\nHello! How can I help you today?",
                 "<|im_end|>"),
    call=Script("<think>\nThe user wants the weather in Paris. I should call get_weather.\n</think>\n\n<tool_call>\n"
                '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', "<|im_end|>"),
    answer=Script("<think>\nThe tool says it is sunny and warm.\n</think>\n\nIt is sunny in Paris, 18 degrees.",
                  "<|im_end|>"),
    tools_marker="<tool_call>",
    result_marker="<tool_response>",
    avoid=(),
    tail=("<|im_start|>", "assistant", "\n"),
    eos="<|im_end|>",
    bos="<|endoftext|>",
    set_tokens=_QWEN3_ADDED,
)
HARMONY = Family(
    name="gpt-oss",
    vocab="llama-bpe",
    template="openai-gpt-oss-120b",
    plain=Script("<|channel|>analysis<|message|>The user greets me. I will greet them back.<|end|>"
                 "<|start|>assistant<|channel|>final<|message|>Hello! How can I help you today?", "<|return|>"),
    call=Script("<|channel|>analysis<|message|>The user wants the weather in Paris. I should call get_weather.<|end|>"
                '<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>'
                '{"city":"Paris"}', "<|call|>"),
    answer=Script("<|channel|>analysis<|message|>The tool says it is sunny and warm.<|end|>"
                  "<|start|>assistant<|channel|>final<|message|>It is sunny in Paris, 18 degrees.", "<|return|>"),
    tools_marker="namespace",  # the developer message declares "namespace functions {" when tools are given
    result_marker="<|call|>",  # a tool call in the history ends with it (the model itself stops there)
    avoid=("assistant",),  # "<|end|><|start|>assistant" also ends the prompt: the script spells it otherwise
    tail=("<|end|>", "<|start|>", "assistant"),
    eos="<|return|>",
    bos="<|startoftext|>",
    add_tokens=_HARMONY_ADDED,
)
FAMILIES = {f.name: f for f in (QWEN3, HARMONY)}


# ---- the vocabulary ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Vocab:
    """A tokenizer as a GGUF stores it, with the bytes each token stands for."""

    model: str
    pre: str
    tokens: tuple[str, ...]
    types: tuple[int, ...]
    merges: tuple[str, ...]

    @functools.cached_property
    def pieces(self) -> tuple[bytes, ...]:
        """Each token's bytes: byte-level BPE decoded, control and user-defined tokens as their text."""
        from moelocal.testmodels import _byte_chars

        back = {c: b for b, c in enumerate(_byte_chars())}
        out = []
        for text, kind in zip(self.tokens, self.types, strict=True):
            if kind in (_CONTROL, _USER_DEFINED):
                out.append(text.encode())
            else:
                try:
                    out.append(bytes(back[c] for c in text))
                except KeyError:  # not byte-level text: the token as it is
                    out.append(text.encode())
        return tuple(out)

    @functools.cached_property
    def by_piece(self) -> dict[bytes, list[int]]:
        out: dict[bytes, list[int]] = {}
        for i, p in enumerate(self.pieces):
            if self.types[i] in (_NORMAL, _CONTROL, _USER_DEFINED) and p:
                out.setdefault(p, []).append(i)
        return out

    def id(self, text: str) -> int:
        return self.tokens.index(text)


@functools.lru_cache(maxsize=4)
def _read_vocab(path: str) -> Vocab:
    """The tokenizer keys of a GGUF. Read here with struct rather than gguf's GGUFReader, which takes
    20 s over the 300,000 strings of a real vocabulary where this takes well under one."""
    import struct

    import numpy as np

    data = Path(path).read_bytes()
    if data[:4] != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file")
    n_kv = struct.unpack_from("<Q", data, 16)[0]
    pos = 24
    fixed = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}

    def string(at: int) -> tuple[str, int]:
        n = struct.unpack_from("<Q", data, at)[0]
        return data[at + 8 : at + 8 + n].decode("utf-8"), at + 8 + n

    def value(kind: int, at: int) -> tuple[Any, int]:
        if kind == 8:
            return string(at)
        if kind == 9:
            item, count = struct.unpack_from("<IQ", data, at)
            at += 12
            if item == 8:
                out = []
                for _ in range(count):
                    text, at = string(at)
                    out.append(text)
                return tuple(out), at
            size = fixed[item]
            raw = data[at : at + size * count]
            return (tuple(np.frombuffer(raw, np.int32).tolist()) if item == 5 else raw), at + size * count
        return data[at : at + fixed[kind]], at + fixed[kind]

    fields: dict[str, Any] = {}
    for _ in range(n_kv):
        key, pos = string(pos)
        kind = struct.unpack_from("<I", data, pos)[0]
        fields[key], pos = value(kind, pos + 4)
    return Vocab(model=fields["tokenizer.ggml.model"], pre=fields["tokenizer.ggml.pre"],
                 tokens=fields["tokenizer.ggml.tokens"], types=fields["tokenizer.ggml.token_type"],
                 merges=fields["tokenizer.ggml.merges"])


def family_vocab(family: Family, models_dir: Path) -> Vocab:
    """The family's tokenizer: the real vocabulary with the real model's added special tokens."""
    v = _read_vocab(str(models_dir / f"ggml-vocab-{family.vocab}.gguf"))
    tokens, types = list(v.tokens), list(v.types)
    for i, text, kind in family.set_tokens:
        tokens[i], types[i] = text, kind
    for text, kind in family.add_tokens:
        tokens.append(text)
        types.append(kind)
    return Vocab(v.model, family.pre or v.pre, tuple(tokens), tuple(types), v.merges)


def script_tokens(vocab: Vocab, text: str, avoid: set[int], used: set[int]) -> list[int]:
    """``text`` as token ids: special tokens whole, the rest longest-first, preferring tokens not
    used yet (in ``used``, updated) so the model's states repeat as little as possible; never one of
    ``avoid`` (the prompt's last tokens)."""
    raw = text.encode()
    out: list[int] = []
    i = 0
    longest = 48
    while i < len(raw):
        best: tuple[tuple[int, int], int] | None = None
        for n in range(min(longest, len(raw) - i), 0, -1):
            for tok in vocab.by_piece.get(raw[i : i + n], ()):
                if tok in avoid:
                    continue
                special = vocab.types[tok] in (_CONTROL, _USER_DEFINED)
                rank = (0 if special else 1 if tok not in used else 2, -n)
                if best is None or rank < best[0]:
                    best = (rank, tok)
        if best is None:
            raise ValueError(f"no token spells {raw[i:i + 8]!r}")
        tok = best[1]
        out.append(tok)
        used.add(tok)
        i += len(vocab.pieces[tok])
    return out


# ---- the weights -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Design:
    """The scripts as token ids and the weights that make greedy decoding follow them."""

    vocab: Vocab
    scripts: dict[str, list[int]]  # name -> token ids, the end token last
    slots: dict[int, int]  # token -> its slot (the default slot is 0)
    tensors: dict[str, Any]  # name -> numpy array in numpy order
    margin: float  # the smallest margin of the fitted head over the training examples


def _rope_thetas():
    import numpy as np

    return ROPE_BASE ** (-np.arange(ROPE_DIM // 2) * 2 / ROPE_DIM)


def _prev_head_keys(lag: int):
    """(query, key) of a head that attends to the token ``lag`` places back, whatever the position.

    llama.cpp's NEOX RoPE turns dims (i, i + 16) of a head by pos * theta_i, so a constant query q
    and key k score q . R((n - m) theta) k: with q = (a, 0) and k = a (cos lag theta, sin lag theta)
    per pair, the score is a^2 sum_i cos(theta_i (m - n - lag)) / sqrt(64), highest at m - n = lag.
    """
    import numpy as np

    th = _rope_thetas()
    d = np.arange(0, 8192)
    s = np.cos(np.outer(d - lag, th)).sum(1)
    gap = s[lag] - np.delete(s, lag).max()
    a = math.sqrt(SCORE * math.sqrt(HEAD_DIM) / gap)
    q = np.zeros(HEAD_DIM)
    k = np.zeros(HEAD_DIM)
    half = ROPE_DIM // 2
    q[:half] = a
    k[:half] = a * np.cos(lag * th)
    k[half:ROPE_DIM] = a * np.sin(lag * th)
    return q, k


@functools.lru_cache(maxsize=4)
def design(family: Family, models_dir: Path, seed: int = 0) -> Design:
    """Tokenize the family's scripts and fit the weights that make the model say them."""
    import numpy as np

    vocab = family_vocab(family, models_dir)
    avoid = set()
    for text in family.avoid:
        avoid.update(vocab.by_piece.get(text.encode(), []))
    used: set[int] = set()
    scripts = {name: script_tokens(vocab, s.text, avoid, used) + [vocab.id(s.end)]
               for name, s in family.scripts().items()}
    states = sorted({t for ids in scripts.values() for t in ids[:-1]})
    if len(states) + 1 > N_EMBD - SLOTS:
        raise ValueError(f"the scripts use {len(states)} distinct tokens; at most {N_EMBD - SLOTS - 1} fit")
    slots = {t: i + 1 for i, t in enumerate(states)}  # slot 0: every other token
    tools, result = vocab.id(family.tools_marker), vocab.id(family.result_marker)
    rng = np.random.default_rng(seed)
    n = N_EMBD
    codes = rng.standard_normal((len(states) + 1, CODE_DIM)) / math.sqrt(CODE_DIM)

    def embedding(tok: int) -> np.ndarray:
        x = np.zeros(n)
        x[SLOTS + slots.get(tok, 0)] = 1.0
        if tok == tools:
            x[M_TOOLS] = 1.0
        if tok == result:
            x[M_RESULT] = 1.0
        return x

    def value_scale(tok: int) -> float:
        """What attn_norm leaves of a slot's one: 1 over the root mean square of the embedding, times
        the 1 / sqrt(n) the value projection carries (so a plain token's code comes out as it is)."""
        nonzero = 1 + (tok == tools) + (tok == result)
        return 1.0 / math.sqrt(nonzero)

    def features(cur: int, prev: int | None, prev2: int | None, flags: tuple[float, float]) -> np.ndarray:
        x = embedding(cur)
        x[C_TOOLS], x[C_RESULT] = flags
        # the first position attends only to itself, the second to the first at most
        p1 = prev if prev is not None else cur
        p2 = prev2 if prev2 is not None else p1
        x[PREV1:PREV1 + CODE_DIM] = codes[slots.get(p1, 0)] * value_scale(p1)
        x[PREV2:PREV2 + CODE_DIM] = codes[slots.get(p2, 0)] * value_scale(p2)
        return x / math.sqrt((x * x).mean() + 1e-6)  # output_norm (RMS, weight 1)

    # the training examples: every step of every script under the flags that select it, and the
    # start from prompts that end in any way
    which = {"plain": [(0.0, 0.0)], "call": [(1.0, 0.0)], "answer": [(1.0, 1.0), (0.0, 1.0)]}
    plain_token = next(t for t in range(len(vocab.tokens)) if t not in slots and t not in (tools, result))
    others = [plain_token] + [t for t in (tools, result) if t not in slots]
    tail = [vocab.by_piece[text.encode()][0] for text in family.tail]
    feats: list[np.ndarray] = []
    targets: list[int] = []
    for name, ids in scripts.items():
        for flags in which[name]:
            # a prompt ends in a token no script uses (Family.avoid): any before it
            starts = [(o, p, q) for o in others for p in [plain_token, tools, result, *states] for q in others[:1]]
            starts += [(o, p, q) for o in others[:1] for p in others[:1] for q in states]
            starts.append((tail[-1], tail[-2], tail[-3]))  # the generation prompt itself
            for cur, p1, p2 in starts:
                f_tools = max(flags[0], float(tools in (cur, p1, p2)))
                f_result = max(flags[1], float(result in (cur, p1, p2)))
                if (f_tools, f_result) not in which[name]:
                    continue
                feats.append(features(cur, p1, p2, (f_tools, f_result)))
                targets.append(ids[0])
            for k in range(len(ids) - 1):
                cur = ids[k]
                f = (max(flags[0], float(tools in ids[: k + 1])), max(flags[1], float(result in ids[: k + 1])))
                # before the script: the generation prompt, or any prompt
                for before in ([tail[-2:]] + [[t, plain_token] for t in [plain_token, *states]] if k < 2 else [[]]):
                    hist = [*before, *ids[:k]]
                    feats.append(features(cur, hist[-1], hist[-2], f))
                    targets.append(ids[k + 1])
    head, margin = _fit(np.array(feats), np.array(targets))
    tensors = _tensors(family, vocab, slots, codes, head, tools, result)
    return Design(vocab, scripts, slots, tensors, margin)


def _fit(feats, targets) -> tuple[dict[int, Any], float]:
    """Output rows (token -> row) so that each example's target beats every other target and every
    other token (logit 0) by MARGIN: a margin perceptron, which ends where the examples are separable."""
    import numpy as np

    classes = sorted(set(targets.tolist()))
    index = {t: i for i, t in enumerate(classes)}
    y = np.array([index[t] for t in targets.tolist()])
    # least squares first (each example's target at 2 * MARGIN, the rest at 0), then a margin
    # perceptron for the examples that still fall short
    goal = np.zeros((len(y), len(classes) + 1))
    goal[np.arange(len(y)), y] = 2 * MARGIN
    w = np.linalg.lstsq(feats, goal, rcond=None)[0].T  # the last row: every other token, kept at 0
    w[-1] = 0.0
    rows = np.arange(len(y))
    for _ in range(5000):
        s = feats @ w.T
        correct = s[rows, y]
        s[rows, y] = -np.inf
        other = s.argmax(1)
        bad = correct - s[rows, other] < MARGIN
        if not bad.any():
            break
        np.add.at(w, y[bad], 0.1 * feats[bad])
        np.add.at(w, other[bad], -0.1 * feats[bad])
        w[-1] = 0.0
    s = feats @ w.T
    correct = s[rows, y].copy()
    s[rows, y] = -np.inf
    margin = float((correct - s.max(1)).min())
    if margin < MARGIN / 2:
        raise ValueError(f"the scripts cannot be told apart by the model's features (margin {margin:.2f})")
    return {t: w[index[t]] for t in classes}, margin


def _tensors(family: Family, vocab: Vocab, slots: dict[int, int], codes, head: dict[int, Any], tools: int,
             result: int) -> dict[str, Any]:
    import numpy as np

    from moelocal import testmodels

    spec = _spec(len(vocab.tokens))
    n, nv = N_EMBD, len(vocab.tokens)
    out: dict[str, Any] = {}
    for name, shape in testmodels.tensor_shapes(spec):
        dims = tuple(reversed(shape))
        out[name] = np.ones(dims, np.float32) if name.endswith("norm.weight") else np.zeros(dims, np.float32)
    emb = np.zeros((nv, n), np.float32)
    emb[:, SLOTS] = 1.0  # the default slot
    for tok, slot in slots.items():
        emb[tok, SLOTS] = 0.0
        emb[tok, SLOTS + slot] = 1.0
    emb[tools, M_TOOLS] = 1.0
    emb[result, M_RESULT] = 1.0
    out["token_embd.weight"] = emb.astype(np.float16)
    outw = np.zeros((nv, n), np.float32)
    for tok, row in head.items():
        outw[tok] = row
    out["output.weight"] = outw.astype(np.float16)

    b = "blk.0."
    wq, wk, wv, wo = (out[b + t] for t in ("attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight"))
    bq, bk = out[b + "attn_q.bias"], out[b + "attn_k.bias"]
    # heads 0 and 3: markers. The query is constant (its bias, in a dim RoPE leaves alone), the key
    # is the marker bit: a marker scores SCORE, anything else 0; the value is 1 on a marker.
    # attn_norm scales a marker's embedding (a slot and the bit) by sqrt(n / 2).
    for h, bit, flag in ((0, M_TOOLS, C_TOOLS), (3, M_RESULT, C_RESULT)):
        base = h * HEAD_DIM
        bq[base + ROPE_DIM] = 8.0
        wk[base + ROPE_DIM, bit] = SCORE * math.sqrt(HEAD_DIM) / 8.0 / math.sqrt(n / 2)
        wv[base, bit] = 1.0 / math.sqrt(n / 2)
        wo[flag, base] = 1.0
    # heads 1 and 2: the previous token and the one before, their codes into their own dims
    for h, lag, dst in ((1, 1, PREV1), (2, 2, PREV2)):
        base = h * HEAD_DIM
        q, k = _prev_head_keys(lag)
        bq[base : base + HEAD_DIM] = q
        bk[base : base + HEAD_DIM] = k
        wv[base : base + CODE_DIM, SLOTS : SLOTS + codes.shape[0]] = codes.T / math.sqrt(n)
        wo[dst : dst + CODE_DIM, base : base + CODE_DIM] = np.eye(CODE_DIM)
    return out


def _spec(n_vocab: int):
    from moelocal.testmodels import SPECS

    return replace(SPECS["glm4moe"], name="scripted", n_layer=2, n_embd=N_EMBD, n_head=N_HEAD, n_head_kv=N_HEAD,
                   head_dim=HEAD_DIM, n_ff=64, expert_ff=64, shared_ff=64, rope_dim=ROPE_DIM, nextn=0,
                   n_vocab=n_vocab, rope_freq_base=ROPE_BASE, expert_weights_scale=1.0)


# ---- writing -----------------------------------------------------------------------------------


def write_scripted(family: str | Family, models_dir: str | Path, path: str | Path) -> Path:
    """Write the scripted model of ``family`` ("qwen3" or "gpt-oss") to ``path``. ``models_dir`` is
    the vendored llama.cpp's ``models/`` (vocabularies and ``templates/``)."""
    from gguf import GGUFWriter

    from moelocal import testmodels

    fam = FAMILIES[family] if isinstance(family, str) else family
    models_dir = Path(models_dir)
    d = design(fam, models_dir)
    spec = _spec(len(d.vocab.tokens))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    w = GGUFWriter(tmp, spec.arch)
    testmodels._write_hparams(w, spec, "f16", name=f"moelocal scripted {fam.name}")
    v = d.vocab
    w.add_tokenizer_model(v.model)
    w.add_tokenizer_pre(v.pre)
    w.add_token_list(list(v.tokens))
    w.add_token_types(list(v.types))
    w.add_token_merges(list(v.merges))
    w.add_bos_token_id(v.id(fam.bos))
    w.add_eos_token_id(v.id(fam.eos))
    w.add_pad_token_id(v.id(fam.bos))
    w.add_add_bos_token(False)
    w.add_chat_template((models_dir / "templates" / f"{fam.template}.jinja").read_text(encoding="utf-8"))
    for name, data in d.tensors.items():
        w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.replace(path)
    return path


def script_text(family: str | Family, name: str) -> str:
    """The text of one of the family's scripts ("plain", "call", "answer"), its end token left out."""
    fam = FAMILIES[family] if isinstance(family, str) else family
    return fam.scripts()[name].text


def script_ids(family: str | Family, models_dir: str | Path) -> dict[str, list[int]]:
    """The token ids each script is generated as, its end token last (what greedy decoding yields)."""
    fam = FAMILIES[family] if isinstance(family, str) else family
    return design(fam, Path(models_dir)).scripts


__all__ = ["FAMILIES", "HARMONY", "QWEN3", "Family", "Script", "design", "script_ids", "script_text",
           "write_scripted"]


def main(argv: list[str] | None = None) -> None:
    """``python -m moelocal.scripted DIR``: write both scripted models into DIR (to try chat or serve by hand)."""
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="python -m moelocal.scripted", description=main.__doc__)
    ap.add_argument("directory", type=Path)
    ap.add_argument("--models", type=Path, default=Path(sys.prefix) / "share" / "llama.cpp" / "models",
                    help="the vendored llama.cpp's models/ (default: where scripts/install.sh --dev puts it)")
    args = ap.parse_args(argv)
    for name in FAMILIES:
        print(write_scripted(name, args.models, args.directory / f"scripted-{name}.gguf"))


if __name__ == "__main__":
    main()
