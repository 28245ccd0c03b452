"""Greedy reference tokens from HF transformers `generate` (fp32, CPU, one prompt at a time)."""

from __future__ import annotations

import functools

import torch
from transformers import AutoModelForCausalLM, GenerationConfig


@functools.lru_cache(maxsize=4)
def hf_model(path: str):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    # generate() falls back to the checkpoint's generation_config for unset fields: clear EOS
    # there too, or it stops early where the engine (ignore_eos) goes on.
    model.generation_config.eos_token_id = None
    return model


def hf_greedy(path: str, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Exactly max_new_tokens greedy tokens: EOS does not stop it (engine side: ignore_eos)."""
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None,
                           pad_token_id=0, bos_token_id=None)
    with torch.no_grad():
        ids = torch.tensor([prompt_ids])
        # An explicit mask: otherwise generate() takes every pad id (0 = BOS here) for padding.
        out = hf_model(path).generate(ids, attention_mask=torch.ones_like(ids),
                                      generation_config=cfg)
    return out[0, len(prompt_ids):].tolist()
