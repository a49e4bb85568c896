"""Train moelocal's bundled demo model: a tiny Qwen3-MoE that speaks (Jane Austen's) English.

The model is a real ``qwen3moe`` network as llama.cpp runs it -- RMSNorm, grouped-query attention with
per-head q/k RMSNorm and NEOX RoPE, a softmax router choosing the top 2 of 8 SwiGLU experts with their
weights renormalised, tied input/output embeddings -- with a byte-level BPE tokenizer trained here and a
ChatML chat template. The corpus is described in ``scripts/demo_corpus.py``.

Requirements (dev only, never installed with moelocal; see ``scripts/requirements-train.txt``)::

    python3 -m venv /work/train-venv
    /work/train-venv/bin/pip install -r scripts/requirements-train.txt   # torch (CPU), numpy, gguf

Steps (each reads what the previous one wrote under ``--workdir``; ``all`` runs the first four)::

    /work/train-venv/bin/python scripts/train_demo.py all            # data, train, eval, export
    .venv/bin/python scripts/train_demo.py verify                     # llama.cpp vs PyTorch (no torch)

``train`` checkpoints every few minutes and resumes from its last checkpoint when run again. Everything
is seeded, and the step count is fixed, so a run on the same versions reproduces the same model (up to
the non-determinism of multi-threaded float sums). On 2 CPU cores ``all`` takes 25 minutes when they are
idle (1.3 s a step) and took 45 on a shared machine; it must stay under an hour.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import json
import math
import random
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import demo_corpus  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "moelocal" / "data" / "moelocal-demo.gguf"
SEED = 1234

# ---- tokenizer: byte-level BPE, exported as a llama.cpp "gpt2" tokenizer with the "gpt-2" pre-tokenizer --

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# GPT-2's pre-tokenizer regex. On ASCII text (the corpus is made ASCII) [A-Za-z] and [0-9] are exactly
# \p{L} and \p{N}, so Python's re splits as llama.cpp does (checked by `verify`).
PRETOKENIZE = re.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+""")
_SPECIAL_SPLIT = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")")
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (what llama.cpp's BPE vocab expects)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


class Tokenizer:
    """Byte-level BPE: ``tokens`` (id -> text in byte-unicode form), ``merges`` in rank order."""

    def __init__(self, tokens: list[str], merges: list[tuple[str, str]]) -> None:
        self.tokens = tokens
        self.merges = merges
        self.ids = {t: i for i, t in enumerate(tokens)}
        self.ranks = {m: r for r, m in enumerate(merges)}
        self.byte_map = bytes_to_unicode()
        self.byte_unmap = {c: b for b, c in self.byte_map.items()}
        self._cache: dict[str, list[int]] = {}

    @classmethod
    def train(cls, text: str, vocab_size: int) -> Tokenizer:
        """Learn merges on ``text`` until the vocabulary (256 bytes + merges + specials) has ``vocab_size``."""
        byte_map = bytes_to_unicode()
        counts = collections.Counter(PRETOKENIZE.findall(text))
        words = [[byte_map[b] for b in w.encode()] for w in counts]
        freq = list(counts.values())
        pairs: collections.Counter[tuple[str, str]] = collections.Counter()
        where: dict[tuple[str, str], set[int]] = collections.defaultdict(set)
        for i, w in enumerate(words):
            for p in zip(w, w[1:], strict=False):
                pairs[p] += freq[i]
                where[p].add(i)
        tokens = [byte_map[b] for b in range(256)]
        known = set(tokens)
        merges: list[tuple[str, str]] = []
        while len(tokens) + len(SPECIAL_TOKENS) < vocab_size and pairs:
            # Most frequent pair; ties broken by the pair itself so training is deterministic.
            best = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))[0]
            if pairs[best] < 2:
                break
            merges.append(best)
            new = best[0] + best[1]
            if new not in known:
                known.add(new)
                tokens.append(new)
            for i in list(where[best]):
                w = words[i]
                for p in zip(w, w[1:], strict=False):
                    pairs[p] -= freq[i]
                    if pairs[p] <= 0:
                        del pairs[p]
                out, j = [], 0
                while j < len(w):
                    if j + 1 < len(w) and w[j] == best[0] and w[j + 1] == best[1]:
                        out.append(new)
                        j += 2
                    else:
                        out.append(w[j])
                        j += 1
                words[i] = out
                for p in zip(out, out[1:], strict=False):
                    pairs[p] += freq[i]
                    where[p].add(i)
            del where[best]
        return cls(tokens + list(SPECIAL_TOKENS), merges)

    def special(self, name: str) -> int:
        return self.ids[name]

    def _word(self, word: str) -> list[int]:
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        parts = [self.byte_map[b] for b in word.encode()]
        # Apply the lowest-ranked merge present, again and again: what llama.cpp's BPE does.
        while len(parts) > 1:
            ranked = [
                (self.ranks.get((a, b), 1 << 30), k) for k, (a, b) in enumerate(zip(parts, parts[1:], strict=False))
            ]
            rank, k = min(ranked)
            if rank == 1 << 30:
                break
            parts[k : k + 2] = [parts[k] + parts[k + 1]]
        ids = [self.ids[p] for p in parts]
        self._cache[word] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, with the special tokens' text read as those tokens."""
        out: list[int] = []
        for piece in _SPECIAL_SPLIT.split(text):
            if piece in SPECIAL_TOKENS:
                out.append(self.ids[piece])
            elif piece:
                for word in PRETOKENIZE.findall(piece):
                    out.extend(self._word(word))
        return out

    def decode(self, ids: list[int]) -> str:
        text = "".join(self.tokens[i] for i in ids)
        return bytes(self.byte_unmap.get(c, 32) for c in text).decode("utf-8", errors="replace")

    def to_json(self) -> dict:
        return {"tokens": self.tokens, "merges": [list(m) for m in self.merges]}

    @classmethod
    def from_json(cls, data: dict) -> Tokenizer:
        return cls(data["tokens"], [tuple(m) for m in data["merges"]])


# ---- data ----------------------------------------------------------------------------------------


def make_data(workdir: Path, deb: Path | None, vocab_size: int) -> None:
    """Corpus -> tokenizer -> token streams: train (prose + chat, shuffled documents) and held out."""
    t0 = time.time()
    corpus = demo_corpus.build_corpus(demo_corpus.load_novels(deb))
    rng = random.Random(SEED)
    docs: list[str] = []
    for novel in corpus.train_paragraphs:
        # Prose documents: runs of 3 to 12 paragraphs, in order, so the model sees narrative flow.
        i = 0
        while i < len(novel):
            n = rng.randint(3, 12)
            docs.append("\n".join(novel[i : i + n]) + "\n<|endoftext|>")
            i += n
        for turns in demo_corpus.chat_conversations(novel, rng):
            system = rng.choice(demo_corpus.SYSTEM_PROMPTS) if rng.random() < 0.1 else None
            docs.append(demo_corpus.format_chatml(turns, system) + "<|endoftext|>")
    rng.shuffle(docs)
    plain = _SPECIAL_SPLIT.sub(" ", "\n".join(docs))
    tok = Tokenizer.train(plain, vocab_size)
    print(f"tokenizer: {len(tok.tokens)} tokens, {len(tok.merges)} merges ({time.time() - t0:.0f}s)", flush=True)
    train = np.array([i for d in docs for i in tok.encode(d)], dtype=np.int16)
    held = np.array(tok.encode(corpus.held_out_text), dtype=np.int16)
    workdir.mkdir(parents=True, exist_ok=True)
    np.save(workdir / "train.npy", train)
    np.save(workdir / "heldout.npy", held)
    (workdir / "heldout.txt").write_text(corpus.held_out_text)
    (workdir / "tokenizer.json").write_text(json.dumps(tok.to_json()))
    chat_chars = sum(len(d) for d in docs if d.startswith("<|im_start|>"))
    print(
        f"data: {len(train):,} train tokens ({sum(len(d) for d in docs):,} chars, {chat_chars:,} in chats), "
        f"{len(held):,} held-out tokens ({len(corpus.held_out_text):,} chars) ({time.time() - t0:.0f}s)",
        flush=True,
    )


# ---- model ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    n_vocab: int = 4096
    n_ctx: int = 512
    n_embd: int = 192
    n_layer: int = 4
    n_head: int = 6
    n_head_kv: int = 2
    head_dim: int = 32
    n_expert: int = 8
    n_expert_used: int = 2
    expert_ff: int = 256
    rope_base: float = 10000.0
    rms_eps: float = 1e-6


def build_model(cfg: Config):  # noqa: ANN201 - a torch.nn.Module; torch is imported late
    import torch
    import torch.nn.functional as F  # noqa: N812
    from torch import nn

    class RMSNorm(nn.Module):
        def __init__(self, dim: int) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(dim))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.rms_eps) * self.weight

    def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # NEOX style (llama.cpp's rope_type for qwen3moe): dimension i pairs with i + head_dim/2.
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            hd = cfg.head_dim
            self.q = nn.Linear(cfg.n_embd, cfg.n_head * hd, bias=False)
            self.k = nn.Linear(cfg.n_embd, cfg.n_head_kv * hd, bias=False)
            self.v = nn.Linear(cfg.n_embd, cfg.n_head_kv * hd, bias=False)
            self.o = nn.Linear(cfg.n_head * hd, cfg.n_embd, bias=False)
            self.q_norm = RMSNorm(hd)
            self.k_norm = RMSNorm(hd)

        def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
            b, t, _ = x.shape
            hd = cfg.head_dim
            q = self.q_norm(self.q(x).view(b, t, cfg.n_head, hd)).transpose(1, 2)
            k = self.k_norm(self.k(x).view(b, t, cfg.n_head_kv, hd)).transpose(1, 2)
            v = self.v(x).view(b, t, cfg.n_head_kv, hd).transpose(1, 2)
            q, k = rope(q, cos, sin), rope(k, cos, sin)
            rep = cfg.n_head // cfg.n_head_kv
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.o(y.transpose(1, 2).reshape(b, t, cfg.n_head * hd))

    class MoE(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            e, d, f = cfg.n_expert, cfg.n_embd, cfg.expert_ff
            self.router = nn.Linear(d, e, bias=False)
            self.gate = nn.Parameter(torch.randn(e, f, d) * 0.02)
            self.up = nn.Parameter(torch.randn(e, f, d) * 0.02)
            self.down = nn.Parameter(torch.randn(e, d, f) * 0.02 / math.sqrt(2 * cfg.n_layer))
            self.aux = torch.zeros(())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            shape = x.shape
            x = x.reshape(-1, shape[-1])
            probs = F.softmax(self.router(x), dim=-1)
            w, idx = probs.topk(cfg.n_expert_used, dim=-1)
            w = w / w.sum(-1, keepdim=True).clamp_min(6.103515625e-5)  # llama.cpp's norm_w, same clamp
            flat = idx.reshape(-1)
            order = flat.argsort(stable=True)
            token = order // cfg.n_expert_used
            counts = torch.bincount(flat, minlength=cfg.n_expert)
            xs = x[token]
            outs = []
            for e, chunk in enumerate(xs.split(counts.tolist())):
                h = F.silu(chunk @ self.gate[e].T) * (chunk @ self.up[e].T)
                outs.append(h @ self.down[e].T)
            ys = torch.cat(outs) * w.reshape(-1)[order, None]
            out = torch.zeros_like(x).index_add_(0, token, ys)
            # Switch-style balance loss: keeps all eight experts in use.
            frac = counts.float() / flat.numel()
            self.aux = cfg.n_expert * (frac * probs.mean(0)).sum()
            self.last_counts = counts.detach()
            return out.view(shape)

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn_norm = RMSNorm(cfg.n_embd)
            self.attn = Attention()
            self.ffn_norm = RMSNorm(cfg.n_embd)
            self.moe = MoE()

        def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
            x = x + self.attn(self.attn_norm(x), cos, sin)
            return x + self.moe(self.ffn_norm(x))

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(cfg.n_vocab, cfg.n_embd)
            self.blocks = nn.ModuleList(Block() for _ in range(cfg.n_layer))
            self.norm = RMSNorm(cfg.n_embd)
            nn.init.normal_(self.embed.weight, std=0.02)
            for blk in self.blocks:
                for lin in (blk.attn.q, blk.attn.k, blk.attn.v, blk.moe.router):
                    nn.init.normal_(lin.weight, std=0.02)
                nn.init.normal_(blk.attn.o.weight, std=0.02 / math.sqrt(2 * cfg.n_layer))
            inv = 1.0 / (cfg.rope_base ** (torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim))
            ang = torch.arange(cfg.n_ctx).float()[:, None] * inv[None, :]
            self.register_buffer("cos", ang.cos(), persistent=False)
            self.register_buffer("sin", ang.sin(), persistent=False)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            t = ids.shape[1]
            x = self.embed(ids)
            for blk in self.blocks:
                x = blk(x, self.cos[:t], self.sin[:t])
            return self.norm(x) @ self.embed.weight.T  # tied output, as llama.cpp does without output.weight

        def aux_loss(self) -> torch.Tensor:
            return sum(blk.moe.aux for blk in self.blocks) / cfg.n_layer

    return Model()


# ---- training ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1100
    batch: int = 12
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup: int = 100
    weight_decay: float = 0.1
    aux_weight: float = 0.01
    checkpoint_every_s: float = 240.0
    threads: int = 2


def lr_at(step: int, tc: TrainConfig) -> float:
    if step < tc.warmup:
        return tc.lr * (step + 1) / tc.warmup
    p = (step - tc.warmup) / max(1, tc.steps - tc.warmup)
    return tc.min_lr + 0.5 * (tc.lr - tc.min_lr) * (1 + math.cos(math.pi * p))


def train(workdir: Path, cfg: Config, tc: TrainConfig) -> None:
    """Train, saving ``ckpt.pt`` every few minutes and resuming from it when present."""
    import torch

    torch.set_num_threads(tc.threads)
    torch.manual_seed(SEED)
    data = torch.from_numpy(np.load(workdir / "train.npy").astype(np.int64))
    model = build_model(cfg)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=tc.lr,
        betas=(0.9, 0.95),
    )
    ckpt_path = workdir / "ckpt.pt"
    step, elapsed = 0, 0.0
    if ckpt_path.exists():
        state = torch.load(ckpt_path, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, elapsed = state["step"], state["elapsed"]
        print(f"resumed at step {step} ({elapsed / 60:.1f} min trained)", flush=True)

    def save() -> None:
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save(
            {
                "model": model.state_dict(),
                "opt": opt.state_dict(),
                "step": step,
                "elapsed": elapsed,
                "config": asdict(cfg),
                "train": asdict(tc),
            },
            tmp,
        )
        tmp.replace(ckpt_path)

    t_last, t_saved = time.time(), time.time()
    losses: list[float] = []
    while step < tc.steps:
        # Batches depend only on the seed and the step, so a resumed run sees the same data.
        g = torch.Generator().manual_seed(SEED * 100_003 + step)
        starts = torch.randint(0, len(data) - cfg.n_ctx - 1, (tc.batch,), generator=g)
        chunk = torch.stack([data[s : s + cfg.n_ctx + 1] for s in starts.tolist()])
        for group in opt.param_groups:
            group["lr"] = lr_at(step, tc)
        logits = model(chunk[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, cfg.n_vocab), chunk[:, 1:].reshape(-1))
        total = loss + tc.aux_weight * model.aux_loss()
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        now = time.time()
        elapsed += now - t_last
        t_last = now
        losses.append(loss.item())
        if step % 50 == 0 or step == tc.steps:
            use = torch.stack([blk.moe.last_counts for blk in model.blocks]).float()
            spread = (use / use.sum(-1, keepdim=True)).max().item()
            print(
                f"step {step}/{tc.steps} loss {sum(losses) / len(losses):.3f} lr {lr_at(step - 1, tc):.2e} "
                f"busiest expert {spread:.0%} {elapsed / 60:.1f} min",
                flush=True,
            )
            losses.clear()
        if now - t_saved > tc.checkpoint_every_s or step == tc.steps:
            save()
            t_saved = now
    print(f"trained {step} steps in {elapsed / 60:.1f} min", flush=True)


def load_trained(workdir: Path):  # noqa: ANN201
    import torch

    state = torch.load(workdir / "ckpt.pt", weights_only=False)
    cfg = Config(**state["config"])
    model = build_model(cfg)
    model.load_state_dict(state["model"])
    model.eval()
    return cfg, model, state


# ---- evaluation ----------------------------------------------------------------------------------


def windows(tokens: np.ndarray, n_ctx: int) -> list[np.ndarray]:
    """Non-overlapping windows of the held-out stream; each scores its tokens 1..n_ctx-1."""
    return [tokens[i : i + n_ctx] for i in range(0, len(tokens) - n_ctx + 1, n_ctx)]


def unigram_perplexity(train: np.ndarray, held: np.ndarray, n_vocab: int, n_ctx: int) -> float:
    """Perplexity of add-one unigram frequencies from the training tokens, on the same scored tokens."""
    counts = np.bincount(train.astype(np.int64), minlength=n_vocab) + 1.0
    logp = np.log(counts / counts.sum())
    scored = np.concatenate([w[1:] for w in windows(held, n_ctx)]).astype(np.int64)
    return float(np.exp(-logp[scored].mean()))


def evaluate(workdir: Path) -> None:
    """Held-out perplexity of the PyTorch model, the unigram baseline, and reference logits for `verify`."""
    import torch

    torch.set_num_threads(2)
    cfg, model, state = load_trained(workdir)
    held = np.load(workdir / "heldout.npy").astype(np.int64)
    nll = []
    with torch.no_grad():
        for w in windows(held, cfg.n_ctx):
            ids = torch.from_numpy(w)[None]
            logp = torch.log_softmax(model(ids)[0, :-1].double(), -1)
            nll.append(-logp.gather(-1, ids[0, 1:, None]).squeeze(-1).numpy())
        ref_ids = torch.from_numpy(held[:64])[None]
        ref_logits = model(ref_ids)[0].numpy()
    nll_all = np.concatenate(nll)
    ppl = float(np.exp(nll_all.mean()))
    uni = unigram_perplexity(np.load(workdir / "train.npy"), held, cfg.n_vocab, cfg.n_ctx)
    np.savez(workdir / "reference.npz", nll=nll_all, ref_ids=held[:64], ref_logits=ref_logits)
    result = {
        "heldout_ppl_torch": ppl,
        "unigram_ppl": uni,
        "scored_tokens": len(nll_all),
        "train_minutes": state["elapsed"] / 60,
        "steps": state["step"],
    }
    (workdir / "eval.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1), flush=True)


# ---- export --------------------------------------------------------------------------------------


def export(workdir: Path, out: Path, qtype: str) -> None:
    """Write the trained model as a qwen3moe GGUF (``qtype`` "Q8_0" or "F16" for the big matrices)."""
    import gguf

    cfg, model, state = load_trained(workdir)
    tok = Tokenizer.from_json(json.loads((workdir / "tokenizer.json").read_text()))
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w = gguf.GGUFWriter(str(out), "qwen3moe")
    w.add_name("moelocal demo")
    w.add_description(
        "A tiny Qwen3-MoE trained by moelocal's scripts/train_demo.py on Jane Austen's novels (public domain)."
    )
    w.add_license("MIT")
    w.add_context_length(cfg.n_ctx)
    w.add_embedding_length(cfg.n_embd)
    w.add_block_count(cfg.n_layer)
    w.add_feed_forward_length(cfg.expert_ff * cfg.n_expert_used)
    w.add_expert_feed_forward_length(cfg.expert_ff)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_head_kv)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_base)
    w.add_layer_norm_rms_eps(cfg.rms_eps)
    w.add_expert_count(cfg.n_expert)
    w.add_expert_used_count(cfg.n_expert_used)
    ftype = {"Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "F16": gguf.LlamaFileType.MOSTLY_F16}[qtype]
    w.add_file_type(ftype)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tok.tokens)
    types = [gguf.TokenType.CONTROL if t in SPECIAL_TOKENS else gguf.TokenType.NORMAL for t in tok.tokens]
    w.add_token_types(types)
    w.add_token_merges([f"{a} {b}" for a, b in tok.merges])
    w.add_bos_token_id(tok.special("<|endoftext|>"))
    w.add_eos_token_id(tok.special("<|im_end|>"))
    w.add_eot_token_id(tok.special("<|im_end|>"))
    w.add_pad_token_id(tok.special("<|endoftext|>"))
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)

    qt = getattr(gguf.GGMLQuantizationType, qtype)

    def put(name: str, arr: np.ndarray, quantize: bool = True) -> None:
        if arr.ndim == 1 or not quantize:
            w.add_tensor(name, arr.astype(np.float32))
        elif qt == gguf.GGMLQuantizationType.F16:
            w.add_tensor(name, arr.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(arr.astype(np.float32), qt), raw_dtype=qt)

    put("token_embd.weight", sd["embed.weight"])
    put("output_norm.weight", sd["norm.weight"])
    for i in range(cfg.n_layer):
        p = f"blocks.{i}."
        put(f"blk.{i}.attn_norm.weight", sd[p + "attn_norm.weight"])
        put(f"blk.{i}.attn_q.weight", sd[p + "attn.q.weight"])
        put(f"blk.{i}.attn_k.weight", sd[p + "attn.k.weight"])
        put(f"blk.{i}.attn_v.weight", sd[p + "attn.v.weight"])
        put(f"blk.{i}.attn_output.weight", sd[p + "attn.o.weight"])
        put(f"blk.{i}.attn_q_norm.weight", sd[p + "attn.q_norm.weight"])
        put(f"blk.{i}.attn_k_norm.weight", sd[p + "attn.k_norm.weight"])
        put(f"blk.{i}.ffn_norm.weight", sd[p + "ffn_norm.weight"])
        # The router stays F32, as llama.cpp's converter keeps it: routing is sensitive to rounding.
        put(f"blk.{i}.ffn_gate_inp.weight", sd[p + "moe.router.weight"], quantize=False)
        put(f"blk.{i}.ffn_gate_exps.weight", sd[p + "moe.gate"])  # [expert, ff, embd]
        put(f"blk.{i}.ffn_up_exps.weight", sd[p + "moe.up"])
        put(f"blk.{i}.ffn_down_exps.weight", sd[p + "moe.down"])  # [expert, embd, ff]
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB, {qtype})", flush=True)


# ---- verify (runs in moelocal's own venv: llama.cpp, no torch) ----------------------------------


class LlamaRunner:
    """A llama.cpp model + context through the low-level API, with use_extra_bufts off (the AMX trap)."""

    def __init__(self, path: Path, n_ctx: int = 512, threads: int = 2) -> None:
        import llama_cpp as lc

        self.lc = lc
        lc.llama_backend_init()
        mp = lc.llama_model_default_params()
        mp.use_extra_bufts = False
        self.model = lc.llama_model_load_from_file(str(path).encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        self.vocab = lc.llama_model_get_vocab(self.model)
        cp = lc.llama_context_default_params()
        cp.n_ctx = cp.n_batch = cp.n_ubatch = n_ctx
        cp.n_threads = cp.n_threads_batch = threads
        self.ctx = lc.llama_init_from_model(self.model, cp)
        self.n_vocab = lc.llama_vocab_n_tokens(self.vocab)

    def tokenize(self, text: str, special: bool = True) -> list[int]:
        raw = text.encode()
        buf = (self.lc.llama_token * (len(raw) + 8))()
        n = self.lc.llama_tokenize(self.vocab, raw, len(raw), buf, len(buf), False, special)
        return list(buf[:n])

    def piece(self, token: int) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = self.lc.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        return bytes(buf[:n])

    def logits(self, ids: list[int], start: int = 0) -> np.ndarray:
        """Logits after each of ``ids``, which are decoded at positions start, start+1, ..."""
        lc = self.lc
        if start == 0:
            lc.llama_memory_clear(lc.llama_get_memory(self.ctx), True)
        batch = lc.llama_batch_init(len(ids), 0, 1)
        for i, t in enumerate(ids):
            batch.token[i] = t
            batch.pos[i] = start + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = True
        batch.n_tokens = len(ids)
        if lc.llama_decode(self.ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")
        ptr = lc.llama_get_logits(self.ctx)
        out = np.ctypeslib.as_array(ptr, shape=(len(ids), self.n_vocab)).copy()
        lc.llama_batch_free(batch)
        return out

    def chat(self, prompt: str, max_tokens: int = 60, temp: float = 0.0, seed: int = 0) -> str:
        """One assistant reply to ``prompt`` through the ChatML template (greedy when temp is 0)."""
        text = demo_corpus.format_chatml([("user", prompt)]) + "<|im_start|>assistant\n"
        ids = self.tokenize(text)
        rng = np.random.default_rng(seed)
        eos = self.lc.llama_vocab_eos(self.vocab)
        out: list[int] = []
        logits = self.logits(ids)[-1]
        pos = len(ids)
        for _ in range(max_tokens):
            if temp > 0:
                top = np.argsort(logits)[-40:]
                p = np.exp((logits[top] - logits[top].max()) / temp)
                tok = int(rng.choice(top, p=p / p.sum()))
            else:
                tok = int(np.argmax(logits))
            if tok == eos:
                break
            out.append(tok)
            logits = self.logits([tok], start=pos)[-1]
            pos += 1
        return b"".join(self.piece(t) for t in out).decode("utf-8", errors="replace")


def verify(workdir: Path, model_path: Path) -> None:
    """llama.cpp on the exported file vs PyTorch: tokenization, held-out perplexity, logits."""
    ref = np.load(workdir / "reference.npz")
    tok = Tokenizer.from_json(json.loads((workdir / "tokenizer.json").read_text()))
    run = LlamaRunner(model_path)
    text = (workdir / "heldout.txt").read_text()
    ours, theirs = tok.encode(text), run.tokenize(text, special=False)
    chat = demo_corpus.format_chatml([("user", "Hello! Who are you?")]) + "<|im_start|>assistant\n"
    print(
        f"tokenization of held-out text: identical={ours == theirs} ({len(ours)} tokens); "
        f"chat prompt identical={tok.encode(chat) == run.tokenize(chat)}"
    )
    held = np.array(theirs)
    nll = []
    for w in windows(held, Config().n_ctx):
        lg = run.logits(w.tolist())[:-1].astype(np.float64)
        lse = np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1)) + lg.max(-1)
        nll.append(lse - lg[np.arange(len(lg)), w[1:]])
    nll_cpp = np.concatenate(nll)
    lg = run.logits(ref["ref_ids"].tolist())
    diff = np.abs(lg - ref["ref_logits"])
    agree = (lg.argmax(-1) == ref["ref_logits"].argmax(-1)).mean()
    result = {
        "file": str(model_path),
        "size_bytes": model_path.stat().st_size,
        "heldout_ppl_llamacpp": float(np.exp(nll_cpp.mean())),
        "heldout_ppl_torch": float(np.exp(ref["nll"].mean())),
        "per_token_nll_mean_abs_diff": float(np.abs(nll_cpp - ref["nll"]).mean()),
        "logits_max_abs_diff": float(diff.max()),
        "logits_mean_abs_diff": float(diff.mean()),
        "argmax_agreement": float(agree),
    }
    print(json.dumps(result, indent=1))
    prompts = (
        "Tell me a story.",
        "Hello! How are you today?",
        "What do you think of Mr. Darcy?",
        "Tell me about Emma.",
        "It was a fine morning.",
    )
    for p in prompts:
        print(f"\n> {p}\n{run.chat(p)}")
        print(f"[sampled, temp 0.8] {run.chat(p, temp=0.8, seed=1)}")


# ---- command line --------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=("data", "train", "eval", "export", "all", "verify"))
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/moelocal-demo-train"))
    parser.add_argument("--deb", type=Path, help="the r-cran-janeaustenr .deb (default: apt-get download it)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--qtype", choices=("Q8_0", "F16"), default="Q8_0")
    parser.add_argument("--steps", type=int, default=TrainConfig.steps)
    parser.add_argument("--vocab", type=int, default=Config.n_vocab)
    args = parser.parse_args()
    cfg = Config(n_vocab=args.vocab)
    tc = TrainConfig(steps=args.steps)
    t0 = time.time()
    if args.step in ("data", "all"):
        make_data(args.workdir, args.deb, cfg.n_vocab)
    if args.step in ("train", "all"):
        train(args.workdir, cfg, tc)
    if args.step in ("eval", "all"):
        evaluate(args.workdir)
    if args.step in ("export", "all"):
        export(args.workdir, args.out, args.qtype)
    if args.step == "verify":
        verify(args.workdir, args.out)
    print(f"{args.step}: {(time.time() - t0) / 60:.1f} min wall", flush=True)


if __name__ == "__main__":
    main()
