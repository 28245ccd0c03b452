"""Llama-family decoder (Llama, Mistral, Qwen2) in plain PyTorch over a flat batch of tokens.

One forward runs prefill chunks and decode tokens of many requests together: tokens are
flattened to [T], positions say where each sits in its sequence, and the attention backend
(planned once per step) knows which pages hold each request's KV.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.attention.base import AttentionBackend
from engine.model_arch import ModelArch
from engine.rope import RotaryEmbedding


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class DecoderLayer(nn.Module):
    def __init__(self, arch: ModelArch) -> None:
        super().__init__()
        self.arch = arch
        h = arch.hidden_size
        self.input_norm = RMSNorm(h, arch.rms_norm_eps)
        # q, k and v (and gate and up) are fused: one matmul each instead of three (two).
        self.qkv_proj = nn.Linear(h, arch.q_size + 2 * arch.kv_size, bias=arch.attention_bias)
        self.o_proj = nn.Linear(arch.q_size, h, bias=False)
        self.post_attn_norm = RMSNorm(h, arch.rms_norm_eps)
        self.gate_up_proj = nn.Linear(h, 2 * arch.intermediate_size, bias=False)
        self.down_proj = nn.Linear(arch.intermediate_size, h, bias=False)

    def forward(self, layer: int, x: torch.Tensor, positions: torch.Tensor, rope: RotaryEmbedding,
                backend: AttentionBackend, kv_cache: torch.Tensor) -> torch.Tensor:
        a = self.arch
        t = x.shape[0]
        qkv = self.qkv_proj(self.input_norm(x))  # [T, q_size + 2 * kv_size]
        q, k, v = qkv.split([a.q_size, a.kv_size, a.kv_size], dim=-1)
        q, k = rope(positions, q.view(t, a.num_heads, a.head_dim),
                    k.view(t, a.num_kv_heads, a.head_dim))
        attn = backend.forward(layer, q, k, v.view(t, a.num_kv_heads, a.head_dim), kv_cache)
        x = x + self.o_proj(attn.reshape(t, a.q_size))  # [T, H]
        gate, up = self.gate_up_proj(self.post_attn_norm(x)).chunk(2, dim=-1)
        return x + self.down_proj(F.silu(gate) * up)


class CausalLM(nn.Module):
    def __init__(self, arch: ModelArch, max_positions: int) -> None:
        super().__init__()
        self.arch = arch
        self.embed_tokens = nn.Embedding(arch.vocab_size, arch.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(arch) for _ in range(arch.num_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.lm_head = nn.Linear(arch.hidden_size, arch.vocab_size, bias=False)
        if arch.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rope = RotaryEmbedding(arch.head_dim, max_positions, arch.rope_theta,
                                    arch.rope_scaling)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[torch.Tensor], backend: AttentionBackend) -> torch.Tensor:
        """input_ids, positions [T] -> final hidden states [T, H] (normed)."""
        x = self.embed_tokens(input_ids)
        for i, layer in enumerate(self.layers):
            x = layer(i, x, positions, self.rope, backend, kv_caches[i])
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, H] -> [N, vocab] float32."""
        return self.lm_head(hidden).float()
