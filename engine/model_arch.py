"""The model's architecture, read from a Hugging Face `config.json` through AutoConfig."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


@dataclass(frozen=True)
class ModelArch:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict = field(default_factory=dict)  # includes "rope_type"
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    sliding_window: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_attention_heads ({self.num_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_kv_heads})")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @staticmethod
    def from_pretrained(path: str | Path) -> ModelArch:
        from transformers import AutoConfig

        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: no config.json (expected a local Hugging Face "
                                    "model directory)")
        archs = json.loads((path / "config.json").read_text()).get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ValueError(f"{path}: unsupported architecture {archs}; pdserve supports "
                             f"{', '.join(SUPPORTED_ARCHITECTURES)}")
        cfg = AutoConfig.from_pretrained(path, trust_remote_code=False)
        return ModelArch.from_hf_config(cfg, arch, _eos_ids(path, cfg))

    @staticmethod
    def from_hf_config(cfg, arch: str, eos_ids: tuple[int, ...] = ()) -> ModelArch:
        # transformers 5 keeps rope settings in `rope_parameters`; 4.x in rope_theta/rope_scaling.
        rope = dict(getattr(cfg, "rope_scaling", None) or {})
        rope.update(getattr(cfg, "rope_parameters", None) or {})
        theta = rope.pop("rope_theta", getattr(cfg, "rope_theta", 10000.0))
        rope["rope_type"] = rope.get("rope_type", rope.get("type", "default"))
        heads = cfg.num_attention_heads
        window = getattr(cfg, "sliding_window", None)
        if arch == "Qwen2ForCausalLM" and not getattr(cfg, "use_sliding_window", False):
            window = None
        return ModelArch(
            architecture=arch,
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_layers=cfg.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
            rms_norm_eps=cfg.rms_norm_eps,
            rope_theta=float(theta),
            rope_scaling=rope,
            max_position_embeddings=cfg.max_position_embeddings,
            tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
            attention_bias=(arch == "Qwen2ForCausalLM"
                            or bool(getattr(cfg, "attention_bias", False))),
            sliding_window=window,
            eos_token_ids=eos_ids,
            bos_token_id=getattr(cfg, "bos_token_id", None),
        )


def _eos_ids(path: Path, cfg) -> tuple[int, ...]:
    """EOS ids from generation_config.json when present (it may list several), else config."""
    eos = getattr(cfg, "eos_token_id", None)
    gen = path / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id", eos)
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (eos,)
