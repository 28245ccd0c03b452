"""Deterministic tiny checkpoints (Llama / Mistral / Qwen2) that HF transformers loads as-is.

`make_tiny_model` writes a real model directory: config.json, model.safetensors (fp32, random
weights from a seeded generator), a byte-level BPE tokenizer trained on `data/tiny_corpus.txt`,
tokenizer_config.json with a chat template, and generation_config.json. Same family and seed
give byte-identical files, so the embedded default model never needs a hub download.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.config import default_model_dir

CORPUS = Path(__file__).parent / "data" / "tiny_corpus.txt"
VOCAB_SIZE = 2000  # including the special tokens
BOS, EOS, SYSTEM, USER, ASSISTANT, END = (
    "<|begin_of_text|>", "<|end_of_text|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
)
SPECIAL_TOKENS = [BOS, EOS, SYSTEM, USER, ASSISTANT, END]  # ids 0..5, in this order

# Each message is "<|role|>\n" + content + "<|end|>\n"; add_generation_prompt opens an assistant
# turn. BOS comes from the template because chat prompts are encoded without special tokens.
_CHAT_TEMPLATE = (
    "{%- if bos_token %}{{ bos_token }}{% endif -%}\n"
    "{%- for message in messages -%}\n"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}\n"
    "{{ raise_exception('unknown role: ' + message['role']) }}\n"
    "{%- endif -%}\n"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif -%}\n"
)


@dataclass(frozen=True)
class Family:
    architecture: str
    model_type: str
    num_key_value_heads: int
    rope_theta: float
    rms_norm_eps: float
    add_bos: bool  # BOS prepended by the tokenizer's post-processor
    qkv_bias: bool = False
    tie_word_embeddings: bool = False
    llama3_rope: bool = False


FAMILIES = {
    "llama": Family("LlamaForCausalLM", "llama", num_key_value_heads=2, rope_theta=500000.0,
                    rms_norm_eps=1e-5, add_bos=True, llama3_rope=True),
    "mistral": Family("MistralForCausalLM", "mistral", num_key_value_heads=4, rope_theta=10000.0,
                      rms_norm_eps=1e-5, add_bos=True),
    "qwen2": Family("Qwen2ForCausalLM", "qwen2", num_key_value_heads=2, rope_theta=1000000.0,
                    rms_norm_eps=1e-6, add_bos=False, qkv_bias=True, tie_word_embeddings=True),
}
HIDDEN, LAYERS, HEADS, HEAD_DIM, INTERMEDIATE, MAX_POS = 256, 4, 8, 32, 688, 2048

# Init scales, chosen empirically (see tests): q/k large enough that attention is far from
# uniform (so RoPE and masking bugs change the output), a wide lm_head for clear top-1 margins.
STD = {"embed": 0.4, "lm_head": 0.4, "q": 0.08, "k": 0.08, "v": 0.06, "o": 0.15, "mlp": 0.12,
       "bias": 0.1, "norm": 0.1}


def default_tiny_model_dir(family: str = "llama") -> Path:
    """$PDSERVE_HOME/models/tiny-llama; other families sit beside it as tiny-<family>."""
    home = default_model_dir()
    return home if family == "llama" else home.with_name(f"tiny-{family}")


@functools.lru_cache(maxsize=1)
def _trained_bpe() -> str:
    """Trains the byte-level BPE once per process; returns its JSON (no post-processor yet)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(CORPUS)], trainer)
    return tok.to_str()


def _qwen2_pre_tokenizer() -> tuple[Any, Any] | None:
    """transformers 5 rebuilds a qwen2 tokenizer with its own NFC normalizer and split regex,
    ignoring tokenizer.json's; writing the same ones keeps the file and AutoTokenizer in step."""
    try:
        from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX
    except ImportError:  # transformers 4.x loads tokenizer.json as written
        return None
    from tokenizers import Regex, normalizers, pre_tokenizers

    split = pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    return normalizers.NFC(), pre_tokenizers.Sequence([split, byte_level])


def build_tokenizer(family: str = "llama"):
    """The trained tokenizer with the family's pipeline (BOS added for llama/mistral)."""
    from tokenizers import Tokenizer, processors

    fam = FAMILIES[family]
    tok = Tokenizer.from_str(_trained_bpe())
    byte_level = processors.ByteLevel(trim_offsets=False)
    if fam.add_bos:
        bos = (BOS, tok.token_to_id(BOS))
        with_bos = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS}:1 $B:1", special_tokens=[bos]
        )
        tok.post_processor = processors.Sequence([byte_level, with_bos])
    else:
        tok.post_processor = byte_level
    if fam.model_type == "qwen2" and (qwen2 := _qwen2_pre_tokenizer()) is not None:
        tok.normalizer, tok.pre_tokenizer = qwen2
    return tok


def _config(fam: Family, vocab_size: int, ids: dict[str, int]) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "architectures": [fam.architecture],
        "model_type": fam.model_type,
        "vocab_size": vocab_size,
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": fam.num_key_value_heads,
        "head_dim": HEAD_DIM,
        "hidden_act": "silu",
        "max_position_embeddings": MAX_POS,
        "rms_norm_eps": fam.rms_norm_eps,
        "initializer_range": 0.02,
        "tie_word_embeddings": fam.tie_word_embeddings,
        "bos_token_id": ids[BOS],
        "eos_token_id": ids[EOS],
        "torch_dtype": "float32",
        "use_cache": True,
        "attention_dropout": 0.0,
    }
    rope: dict[str, Any] = {"rope_type": "default"}
    if fam.llama3_rope:
        rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 1024}
        cfg["rope_scaling"] = dict(rope)
    # Both spellings: transformers 5 reads `rope_parameters`; 4.x and most serving code read
    # `rope_theta` + `rope_scaling`, as found in real Llama 3 checkpoints. Same values.
    cfg["rope_theta"] = fam.rope_theta
    cfg["rope_parameters"] = {**rope, "rope_theta": fam.rope_theta}
    if fam.model_type == "llama":
        cfg.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    if fam.model_type in ("mistral", "qwen2"):
        cfg["sliding_window"] = None
    if fam.model_type == "qwen2":
        cfg.update(use_sliding_window=False, max_window_layers=LAYERS)
    return cfg


def _weights(fam: Family, vocab_size: int, seed: int) -> dict[str, Any]:
    import torch

    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int, std: float, mean: float = 0.0) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float32) * std + mean

    kv = fam.num_key_value_heads * HEAD_DIM
    w = {"model.embed_tokens.weight": randn(vocab_size, HIDDEN, std=STD["embed"])}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        # Norm weights near 1, not exactly 1, so a loader that skips them gives different logits.
        w[p + "input_layernorm.weight"] = randn(HIDDEN, std=STD["norm"], mean=1.0)
        w[p + "self_attn.q_proj.weight"] = randn(HEADS * HEAD_DIM, HIDDEN, std=STD["q"])
        w[p + "self_attn.k_proj.weight"] = randn(kv, HIDDEN, std=STD["k"])
        w[p + "self_attn.v_proj.weight"] = randn(kv, HIDDEN, std=STD["v"])
        if fam.qkv_bias:
            w[p + "self_attn.q_proj.bias"] = randn(HEADS * HEAD_DIM, std=STD["bias"])
            w[p + "self_attn.k_proj.bias"] = randn(kv, std=STD["bias"])
            w[p + "self_attn.v_proj.bias"] = randn(kv, std=STD["bias"])
        w[p + "self_attn.o_proj.weight"] = randn(HIDDEN, HEADS * HEAD_DIM, std=STD["o"])
        w[p + "post_attention_layernorm.weight"] = randn(HIDDEN, std=STD["norm"], mean=1.0)
        w[p + "mlp.gate_proj.weight"] = randn(INTERMEDIATE, HIDDEN, std=STD["mlp"])
        w[p + "mlp.up_proj.weight"] = randn(INTERMEDIATE, HIDDEN, std=STD["mlp"])
        w[p + "mlp.down_proj.weight"] = randn(HIDDEN, INTERMEDIATE, std=STD["mlp"])
    w["model.norm.weight"] = randn(HIDDEN, std=STD["norm"], mean=1.0)
    if not fam.tie_word_embeddings:
        w["lm_head.weight"] = randn(vocab_size, HIDDEN, std=STD["lm_head"])
    return w


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n",
                    encoding="utf-8")


def make_tiny_model(out_dir: str | os.PathLike, family: str = "llama", seed: int = 0) -> Path:
    """Writes a tiny random `family` checkpoint into out_dir; same family+seed, same bytes."""
    from safetensors.torch import save

    if family not in FAMILIES:
        raise ValueError(f"family must be one of {sorted(FAMILIES)}, got {family!r}")
    fam = FAMILIES[family]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tok = build_tokenizer(family)
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    tok.save(str(out / "tokenizer.json"))

    _write_json(out / "config.json", _config(fam, vocab_size, ids))
    # save() + write_bytes rather than save_file, which leaves the file owner-only.
    weights = save(_weights(fam, vocab_size, seed), metadata={"format": "pt"})
    (out / "model.safetensors").write_bytes(weights)

    bos = BOS if fam.add_bos else None
    # unk_token null: otherwise transformers' Qwen2Tokenizer adds its own default unk token.
    specials = {"bos_token": bos, "eos_token": EOS, "pad_token": EOS, "unk_token": None}
    _write_json(out / "tokenizer_config.json", {
        **specials,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "additional_special_tokens": [SYSTEM, USER, ASSISTANT, END],
        "chat_template": _CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MAX_POS,
    })
    _write_json(out / "special_tokens_map.json", {
        **{k: v for k, v in specials.items() if v is not None},
        "additional_special_tokens": [SYSTEM, USER, ASSISTANT, END],
    })
    _write_json(out / "generation_config.json", {
        "bos_token_id": ids[BOS],
        "eos_token_id": [ids[EOS], ids[END]],  # plain text ends at EOS, a chat turn at <|end|>
        "pad_token_id": ids[EOS],
        "do_sample": False,
    })
    return out


def ensure_tiny_model(path: str | os.PathLike | None = None, family: str = "llama",
                      seed: int = 0) -> Path:
    """Returns path, making the model there first if it has no config.json.

    Safe under concurrent callers: each builds in a private temp dir next to path and renames
    it into place; a loser of the rename race discards its copy and uses the winner's.
    """
    dest = Path(path) if path is not None else default_tiny_model_dir(family)
    if (dest / "config.json").exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        make_tiny_model(tmp, family=family, seed=seed)
        tmp.chmod(0o755)  # mkdtemp makes it owner-only
        try:
            os.rename(tmp, dest)  # atomic; replaces dest only if it is an empty directory
        except OSError:
            if not (dest / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
