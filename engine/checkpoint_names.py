"""Checkpoint tensor names -> ours, through one table.

Hugging Face Llama / Mistral / Qwen2 checkpoints keep q/k/v and gate/up as separate linears; the
model fuses them (`qkv_proj`, `gate_up_proj`), so their weights land in row slices of the fused
weight (`shard_rows`). `LAYER_LINEARS` lists the decoder layer's linears once: the loader maps
their tensors from it, and fp8 (engine/fp8_checkpoint.py) reads which checkpoint modules each
fused one is made of.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from engine.model_arch import ModelArch

# our linear -> the checkpoint modules it is made of, in row order, with the shard each fills
LAYER_LINEARS: dict[str, tuple[tuple[str, str | None], ...]] = {
    "qkv_proj": (("self_attn.q_proj", "q"), ("self_attn.k_proj", "k"),
                 ("self_attn.v_proj", "v")),
    "o_proj": (("self_attn.o_proj", None),),
    "gate_up_proj": (("mlp.gate_proj", "gate"), ("mlp.up_proj", "up")),
    "down_proj": (("mlp.down_proj", None),),
}
BIASED = frozenset({"qkv_proj"})  # Qwen2's q/k/v carry biases; no other linear does
_LAYER = r"model\.layers\.(\d+)\."


def _linear_entries() -> Iterator[tuple[str, tuple[str, str | None]]]:
    for ours, parts in LAYER_LINEARS.items():
        for ckpt, shard in parts:
            if ours in BIASED:
                yield _LAYER + re.escape(ckpt) + r"\.(weight|bias)", (f"layers.{{}}.{ours}.{{}}",
                                                                      shard)
            else:
                yield _LAYER + re.escape(ckpt) + r"\.weight", (f"layers.{{}}.{ours}.weight", shard)


# checkpoint name pattern -> (our name, shard); shard None = the whole tensor
WEIGHT_MAP: dict[str, tuple[str, str | None]] = {
    r"model\.embed_tokens\.weight": ("embed_tokens.weight", None),
    r"model\.norm\.weight": ("norm.weight", None),
    r"lm_head\.weight": ("lm_head.weight", None),
    _LAYER + r"input_layernorm\.weight": ("layers.{}.input_norm.weight", None),
    _LAYER + r"post_attention_layernorm\.weight": ("layers.{}.post_attn_norm.weight", None),
    **dict(_linear_entries()),
}
_COMPILED = [(re.compile(p + "$"), target) for p, target in WEIGHT_MAP.items()]


def map_name(name: str) -> tuple[str, str | None] | None:
    """(our name, shard) for a checkpoint tensor; None if the table has no entry for it."""
    for pattern, (target, shard) in _COMPILED:
        m = pattern.match(name)
        if m:
            return target.format(*m.groups()), shard
    return None


def shard_rows(arch: ModelArch, shard: str) -> slice:
    """The rows of a fused weight that one checkpoint module fills."""
    q, kv, inter = arch.q_size, arch.kv_size, arch.intermediate_size
    return {"q": slice(0, q), "k": slice(q, q + kv), "v": slice(q + kv, q + 2 * kv),
            "gate": slice(0, inter), "up": slice(inter, 2 * inter)}[shard]
