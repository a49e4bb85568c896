"""The test models themselves: real llama.cpp loads them, tokenizes with them and generates from them."""

from __future__ import annotations

import re

import gguf
import pytest
from gguf.constants import MODEL_ARCH_NAMES, MODEL_TENSORS, TENSOR_NAMES, GGMLQuantizationType

from moelocal import testmodels
from moelocal.testmodels import ARCHS, CHATML_TEMPLATE, DEFAULT_QUANTS, EXTRA_ARCHS, SPECS, VOCAB_SIZE

MODEL_KEYS = [f"{arch}-{q}" for arch in ARCHS for q in DEFAULT_QUANTS]
PROMPT = "Hello world! The experts of this model are random."


@pytest.mark.parametrize("key", MODEL_KEYS)
def test_every_model_loads_and_generates_in_llama_cpp(models, load_llama, key):
    with load_llama(models[key]) as m:
        prompt = m.tokenize(PROMPT)
        assert len(prompt) >= 8  # a multi-token batch: the case the AMX buffer type crashes on
        out = m.generate(PROMPT, n_predict=4)
    assert len(out) == 4
    assert all(0 <= t < VOCAB_SIZE for t in out)


def test_tokenizer_merges_and_round_trips(models, load_llama):
    with load_llama(models["qwen3moe-f16"]) as m:
        assert m.n_vocab == VOCAB_SIZE
        tokens = m.tokenize(PROMPT)
        assert len(tokens) < len(PROMPT.encode()) // 2  # merges apply, this is not a bytes-only vocab
        assert m.detokenize(tokens) == PROMPT
        chat = "<|im_start|>user\nHi<|im_end|>"
        ids = m.tokenize(chat, special=True)
        assert ids[0] == testmodels.special_token_id("<|im_start|>")
        assert ids[-1] == testmodels.special_token_id("<|im_end|>")
        import llama_cpp

        assert llama_cpp.llama_model_chat_template(m.model, None).decode() == CHATML_TEMPLATE


def test_vocabulary_is_deterministic_and_sized():
    tokens, types, merges = testmodels.vocabulary()
    assert len(tokens) == len(types) == VOCAB_SIZE
    assert len(set(tokens)) == VOCAB_SIZE
    assert tokens[-3:] == testmodels.SPECIAL_TOKENS
    assert types[-3:] == (3, 3, 3) and set(types[:-3]) == {1}
    for merge in merges:  # every merge joins two known tokens into a known token
        a, b = merge.split(" ")
        assert a in tokens and b in tokens and a + b in tokens
    testmodels.vocabulary.cache_clear()
    assert testmodels.vocabulary() == (tokens, types, merges)


@pytest.mark.parametrize("arch", ARCHS + EXTRA_ARCHS)
def test_tensor_names_are_the_architectures_own(arch):
    """Every tensor is one gguf's constants list for the architecture (llama.cpp's loader is stricter still)."""
    spec = SPECS[arch]
    model_arch = {v: k for k, v in MODEL_ARCH_NAMES.items()}[spec.arch]
    allowed = set()
    for t in MODEL_TENSORS[model_arch]:
        for il in range(spec.n_layer + spec.nextn):
            allowed.add(TENSOR_NAMES[t].format(bid=il))
    names = [name for name, _ in testmodels.tensor_shapes(spec)]
    assert len(names) == len(set(names))
    for name in names:
        assert re.sub(r"\.(weight|bias)$", "", name) in allowed, name


def test_quantized_files_hold_the_types_asked_for(models):
    def types(key: str) -> dict[str, GGMLQuantizationType]:
        return {t.name: t.tensor_type for t in gguf.GGUFReader(models[key]).tensors}

    f16, q8, q4 = types("qwen3moe-f16"), types("qwen3moe-q8_0"), types("qwen3moe-q4_k")
    assert f16["blk.0.ffn_up_exps.weight"] == GGMLQuantizationType.F16
    assert f16["blk.0.ffn_gate_inp.weight"] == GGMLQuantizationType.F32
    assert f16["blk.0.attn_norm.weight"] == GGMLQuantizationType.F32
    assert q8["blk.0.ffn_up_exps.weight"] == GGMLQuantizationType.Q8_0
    assert q4["blk.0.ffn_up_exps.weight"] == GGMLQuantizationType.Q4_K
    assert q4["blk.0.ffn_gate_inp.weight"] == GGMLQuantizationType.F32  # llama.cpp never quantizes routers
    assert q4["blk.3.attn_norm.weight"] == GGMLQuantizationType.F32
    # DeepSeek's k_b rows are qk_nope_dim = 64 wide, too short for K-quants: llama.cpp falls back to Q5_0
    ds = types("deepseek2-q4_k")
    assert ds["blk.1.attn_k_b.weight"] == GGMLQuantizationType.Q5_0
    assert ds["blk.1.ffn_down_exps.weight"] == GGMLQuantizationType.Q4_K


@pytest.mark.parametrize("qtype", ["q4_0", "q4_k_m"])
def test_other_quantizations_load_and_generate(models, load_llama, tmp_path, qtype):
    dst = testmodels.quantize(models["llama-moe-f16"], tmp_path / f"llama-moe-{qtype}.gguf", qtype)
    assert not list(tmp_path.glob("*.partial"))
    with load_llama(dst) as m:
        assert len(m.generate(PROMPT, n_predict=2)) == 2


def test_f32_models_load(load_llama, tmp_path):
    path = testmodels.write_model("gpt-oss", tmp_path / "gpt-oss-f32.gguf", dtype="f32")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.ffn_down_exps.weight"] == GGMLQuantizationType.F32
    with load_llama(path) as m:
        assert len(m.generate(PROMPT, n_predict=2)) == 2


def test_write_model_is_deterministic_per_seed(tmp_path):
    a = testmodels.write_model("llama-dense", tmp_path / "a.gguf", seed=1).read_bytes()
    b = testmodels.write_model("llama-dense", tmp_path / "b.gguf", seed=1).read_bytes()
    c = testmodels.write_model("llama-dense", tmp_path / "c.gguf", seed=2).read_bytes()
    assert a == b
    assert len(a) == len(c) and a != c


def test_build_all_keeps_existing_files(models, model_dir):
    path = models["llama-dense-q8_0"]
    before = path.stat().st_mtime_ns
    again = testmodels.build_all(model_dir, quants=("q8_0",), archs=("llama-dense",))
    assert again == {"llama-dense-q8_0": path}
    assert path.stat().st_mtime_ns == before
    assert not list(model_dir.glob("*.partial*"))


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown test architecture 'mamba'"):
        testmodels.write_model("mamba", tmp_path / "x.gguf")
    with pytest.raises(ValueError, match="dtype must be one of f16, f32"):
        testmodels.write_model("qwen3moe", tmp_path / "x.gguf", dtype="bf16")
    with pytest.raises(ValueError, match="qtype must be one of"):
        testmodels.quantize(tmp_path / "x.gguf", tmp_path / "y.gguf", "q3_k")


def test_quantize_failure_is_an_error_and_leaves_nothing(tmp_path):
    src = tmp_path / "not-a-model.gguf"
    src.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(RuntimeError, match="could not quantize"):
        testmodels.quantize(src, tmp_path / "out.gguf", "q8_0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not-a-model.gguf"]
