from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from jinja2.exceptions import TemplateError
from tokenizers import Tokenizer
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from engine import tiny_model
from engine.cli import main as cli_main
from engine.tiny_model import ensure_tiny_model, make_tiny_model

FAMILIES = ["llama", "mistral", "qwen2"]
FILES = [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
]
MULTIBYTE = [
    "naïve café, Größe, señor, cœur — «ok» …",
    "今日はとても良い天気です。春天来了。",
    "Καλημέρα κόσμε, Δt ≈ 0.5",
    "emoji 😊🎉 family 👨‍👩‍👧‍👦 flag 🇯🇵 ✈️",
    "  two leading spaces\n\ttab and newline\n\n",
    "def f(x):\n    return {'k': x ** 2}  # 42",
]


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


@pytest.fixture(scope="module")
def models(tiny_models: dict[str, str]) -> dict[str, Path]:
    """The session's seed-0 models (tests/conftest.py), one per family."""
    return {f: Path(p) for f, p in tiny_models.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_same_seed_gives_identical_files(models, tmp_path, family):
    again = _files(make_tiny_model(tmp_path / "again", family=family, seed=0))
    assert sorted(again) == FILES
    assert again == _files(models[family])


def test_tokenizer_training_is_deterministic():
    assert tiny_model._trained_bpe.__wrapped__() == tiny_model._trained_bpe()


def test_different_seed_changes_only_weights(models, tmp_path):
    other = _files(make_tiny_model(tmp_path / "s1", family="llama", seed=1))
    base = _files(models["llama"])
    assert other["model.safetensors"] != base["model.safetensors"]
    assert {k: v for k, v in other.items() if k != "model.safetensors"} == {
        k: v for k, v in base.items() if k != "model.safetensors"
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_config_round_trips_through_autoconfig(models, tmp_path, family):
    cfg = AutoConfig.from_pretrained(models[family])
    assert cfg.model_type == family
    assert cfg.architectures == [tiny_model.FAMILIES[family].architecture]
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (256, 4, 8)
    assert cfg.head_dim == 32 and cfg.num_key_value_heads < cfg.num_attention_heads  # GQA
    assert cfg.max_position_embeddings == 2048
    assert cfg.tie_word_embeddings == (family == "qwen2")
    rope = cfg.rope_parameters
    if family == "llama":
        assert rope == {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 1024,
        }
    else:
        assert rope["rope_type"] == "default"
        assert cfg.sliding_window is None
    cfg.save_pretrained(tmp_path)
    again = AutoConfig.from_pretrained(tmp_path)
    assert again.to_diff_dict() == cfg.to_diff_dict()


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_loads_and_greedy_generation_is_not_degenerate(models, family):
    tok = AutoTokenizer.from_pretrained(models[family])
    model = AutoModelForCausalLM.from_pretrained(models[family]).eval()
    assert model.config.vocab_size == len(tok) == 2000
    assert model.dtype == torch.float32
    if family == "qwen2":
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
        for name in ("q_proj", "k_proj", "v_proj"):
            bias = getattr(model.model.layers[0].self_attn, name).bias
            assert bias is not None and bias.abs().min() > 0
    else:
        assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    outputs = []
    for prompt in ["The weather today is", "def fibonacci(n):", "Le matin, la boulangerie"]:
        enc = tok(prompt, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(
                **enc,
                max_new_tokens=40,
                do_sample=False,
                output_scores=True,
                return_dict_in_generate=True,
            )
        new = out.sequences[0, enc.input_ids.shape[1] :].tolist()
        assert len(set(new)) >= 20, new
        margins = [float(s[0].topk(2).values.diff().abs()) for s in out.scores]
        assert sorted(margins)[len(margins) // 2] > 0.3  # median top-1/top-2 logit gap
        outputs.append(new)
    assert len({tuple(o) for o in outputs}) == len(outputs)


@pytest.mark.parametrize("family", FAMILIES)
def test_tokenizer_round_trips_and_matches_tokenizer_json(models, family):
    hf = AutoTokenizer.from_pretrained(models[family])
    raw = Tokenizer.from_file(str(models[family] / "tokenizer.json"))
    bos = hf.convert_tokens_to_ids("<|begin_of_text|>")
    for text in MULTIBYTE:
        ids = hf(text).input_ids
        assert ids == raw.encode(text).ids
        assert (ids[0] == bos) == (family != "qwen2")
        plain = hf(text, add_special_tokens=False).input_ids
        assert bos not in plain
        assert hf.decode(plain) == text
        assert hf.decode(ids, skip_special_tokens=True) == text
    owl = hf("🦉", add_special_tokens=False).input_ids  # not in the corpus: byte pieces
    assert len(owl) > 1 and hf.decode(owl) == "🦉"


@pytest.mark.parametrize("family", FAMILIES)
def test_chat_template(models, family):
    tok = AutoTokenizer.from_pretrained(models[family])
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 👋"}]
    bos = "<|begin_of_text|>" if family != "qwen2" else ""
    body = "<|system|>\nBe brief.<|end|>\n<|user|>\nHi 👋<|end|>\n"
    assert tok.apply_chat_template(msgs, tokenize=False) == bos + body
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == bos + body + "<|assistant|>\n"
    ids = tok(text, add_special_tokens=False).input_ids
    specials = [tok.convert_tokens_to_ids(t) for t in ("<|system|>", "<|user|>", "<|assistant|>")]
    assert all(ids.count(i) == 1 for i in specials)
    eos_ids = GenerationConfig.from_pretrained(models[family]).eos_token_id
    assert eos_ids == [tok.eos_token_id, tok.convert_tokens_to_ids("<|end|>")]
    with pytest.raises(TemplateError, match="unknown role"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_ensure_tiny_model_creates_once_then_reuses(tmp_path, monkeypatch):
    monkeypatch.setenv("PDSERVE_HOME", str(tmp_path))
    dest = tmp_path / "models" / "tiny-llama"
    with ThreadPoolExecutor(2) as pool:  # two racing creators: one rename wins, both succeed
        results = list(pool.map(lambda _: ensure_tiny_model(), range(2)))
    assert results == [dest, dest]
    assert sorted(os.listdir(dest.parent)) == ["tiny-llama"]  # no temp dirs left behind
    assert sorted(os.listdir(dest)) == FILES
    monkeypatch.setattr(tiny_model, "make_tiny_model", lambda *a, **k: pytest.fail("rebuilt"))
    assert ensure_tiny_model() == dest
    assert ensure_tiny_model(dest) == dest


def test_cli_make_tiny_model(models, tmp_path):
    assert cli_main(["make-tiny-model", str(tmp_path / "m"), "--family", "qwen2"]) == 0
    assert _files(tmp_path / "m") == _files(models["qwen2"])
