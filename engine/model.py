"""Llama-family decoder (Llama, Mistral, Qwen2) in plain PyTorch over a flat batch of tokens.

One forward runs prefill chunks and decode tokens of many requests together: tokens are
flattened to [T], positions say where each sits in its sequence, and the step's attention plan
(made once per step by the attention backend) knows which pages hold each request's KV.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from engine import fp8_fusion, gemv
from engine.attention.base import AttentionPlan
from engine.fp8_fusion import Pending
from engine.model_arch import ModelArch
from engine.rope import RotaryEmbedding


@functools.cache
def _load_fused_kernels():
    if os.environ.get("PDSERVE_FUSED_KERNELS", "1") == "0":
        return None
    # FlashInfer's CUDA norm kernels, not its CuTe-DSL ones (an extra, optional stack).
    os.environ.setdefault("FLASHINFER_USE_CUDA_NORM", "1")
    try:
        import flashinfer.activation
        import flashinfer.norm
        import flashinfer.rope
    except ImportError:
        return None
    return flashinfer


def fused_kernels(x: torch.Tensor):
    """FlashInfer's fused RMSNorm / RoPE / SiLU-and-mul for fp16/bf16 CUDA tensors, else None.

    On the GPU a decode step is bandwidth- and launch-bound: one kernel instead of the eight of
    the plain-PyTorch RMSNorm (and of the ten of RoPE) matters there. CPU runs never use them.
    """
    if not x.is_cuda or x.dtype not in (torch.float16, torch.bfloat16):
        return None
    return _load_fused_kernels()


def _rope_fused(fi, rope: RotaryEmbedding, positions: torch.Tensor, q: torch.Tensor,
                k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE in place on q and k (views into the qkv output) for the head sizes FlashInfer's
    fast rotary kernel has; the plain version (new tensors) for the others."""
    if q.shape[-1] not in (64, 128, 256, 512):
        return rope(positions, q, k)
    cache = getattr(rope, "_cos_sin_cache", None)
    if cache is None:
        # [max_positions, D] float32: the D/2 distinct cosines, then the D/2 sines.
        half = rope.cos.shape[-1] // 2
        cache = torch.cat([rope.cos[:, :half], rope.sin[:, :half]], dim=-1).float().contiguous()
        rope._cos_sin_cache = cache
    fi.rope.apply_rope_with_cos_sin_cache_inplace(positions, q, k, q.shape[-1], cache,
                                                  is_neox=True)
    return q, k


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fi = fused_kernels(x)
        if fi is not None:
            return fi.norm.rmsnorm(x, self.weight, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class DecoderLayer(nn.Module):
    """One layer over the (hidden, residual) pair that the model carries between layers.

    The running sum of the residual stream is `residual`; `hidden` is the last block's output
    that has not been added to it yet (layer 0: the embeddings, with `residual` None). A layer
    first adds, then norms: on the GPU that is one `fused_add_rmsnorm` kernel, which also
    writes the sum back into `residual`, so the residual add of one layer and the input norm
    of the next are a single kernel instead of two.
    """

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

    def forward(self, layer: int, hidden: torch.Tensor | Pending, residual: torch.Tensor | None,
                positions: torch.Tensor, rope: RotaryEmbedding, plan: AttentionPlan,
                kv_cache: torch.Tensor, rows: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor | Pending, torch.Tensor]:
        """hidden [T, H], residual [T, H] or None -> (mlp_out [R, H], residual [R, H]).

        This layer's output (the input of the next) is `residual + mlp_out`; the caller adds
        them (fused into the next norm on the GPU). On the GPU `hidden` and `residual` are
        updated in place. A layer with fp8 projections returns mlp_out unscaled, as a
        `Pending`, which the next layer's first kernel scales.

        `rows` (indices into T; all T rows if None) are the rows whose output is wanted: the
        layer writes every token's K/V and attends for every token, then runs its output
        projection and MLP on those rows only (the last layer of a prefill, whose other rows
        nobody reads).
        """
        if fp8_fusion.fusable(self):
            return self._forward_fp8(layer, hidden, residual, positions, rope, plan, kv_cache,
                                     rows)
        if isinstance(hidden, Pending):  # after an fp8 layer, in a model with bf16 layers too
            hidden = hidden.value(residual.dtype)
        fi = fused_kernels(hidden)
        if fi is not None:
            return self._forward_fused(fi, layer, hidden, residual, positions, rope, plan,
                                       kv_cache, rows)
        a = self.arch
        t = hidden.shape[0]
        residual = hidden if residual is None else residual + hidden  # [T, H]: layer input
        qkv = self.qkv_proj(self.input_norm(residual))  # [T, q_size + 2 * kv_size]
        q, k, v = qkv.split([a.q_size, a.kv_size, a.kv_size], dim=-1)
        q, k = rope(positions, q.view(t, a.num_heads, a.head_dim),
                    k.view(t, a.num_kv_heads, a.head_dim))
        attn = plan.forward(layer, q, k, v.view(t, a.num_kv_heads, a.head_dim), kv_cache)
        attn = attn.reshape(t, a.q_size)  # [T, q_size]
        if rows is not None:
            attn, residual = attn[rows], residual[rows]  # [R, q_size], [R, H]
        residual = residual + self.o_proj(attn)  # [R, H]
        gate, up = self.gate_up_proj(self.post_attn_norm(residual)).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up), residual

    def _forward_fused(self, fi, layer: int, hidden: torch.Tensor, residual: torch.Tensor | None,
                       positions: torch.Tensor, rope: RotaryEmbedding, plan: AttentionPlan,
                       kv_cache: torch.Tensor, rows: torch.Tensor | None,
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """The same layer in fused GPU kernels: two norm kernels, each also doing an add."""
        a = self.arch
        t = hidden.shape[0]
        norm = self.input_norm
        if residual is None:  # layer 0: the embeddings are the residual stream as they are
            residual, hidden = hidden, fi.norm.rmsnorm(hidden, norm.weight, norm.eps)
        else:  # residual += hidden; hidden = input_norm(residual)
            fi.norm.fused_add_rmsnorm(hidden, residual, norm.weight, norm.eps)
        # One-row projections of CUDA-graph steps may run a compiled reduction (engine/gemv.py).
        qkv = gemv.linear(self.qkv_proj, hidden)  # [T, q_size + 2 * kv_size]
        q, k, v = (y.view(t, -1, a.head_dim)
                   for y in qkv.split([a.q_size, a.kv_size, a.kv_size], dim=-1))
        q, k = _rope_fused(fi, rope, positions, q, k)
        attn = plan.forward(layer, q, k, v, kv_cache).reshape(t, a.q_size)
        if rows is not None:  # indexing copies: the in-place add below writes the copy
            attn, residual = attn[rows], residual[rows]
        h = gemv.linear(self.o_proj, attn)  # [R, H]
        # residual += attention; h = post_attn_norm(residual)
        fi.norm.fused_add_rmsnorm(h, residual, self.post_attn_norm.weight,
                                  self.post_attn_norm.eps)
        up = fi.activation.silu_and_mul(gemv.linear(self.gate_up_proj, h))
        return gemv.linear(self.down_proj, up), residual

    def _forward_fp8(self, layer: int, hidden: torch.Tensor | Pending,
                     residual: torch.Tensor | None, positions: torch.Tensor,
                     rope: RotaryEmbedding, plan: AttentionPlan, kv_cache: torch.Tensor,
                     rows: torch.Tensor | None) -> tuple[Pending, torch.Tensor]:
        """The layer with fp8 projections, each GEMM's scales and the next GEMM's input
        quantization fused into the kernel between them (engine/fp8_fusion.py)."""
        a, t = self.arch, positions.shape[0]
        qkv_p, o_p = self.qkv_proj, self.o_proj
        gate_up_p, down_p = self.gate_up_proj, self.down_proj
        # residual += hidden; xq = quantize(input_norm(residual))
        xq, s, residual = fp8_fusion.add_rmsnorm_quantize(hidden, residual, self.input_norm,
                                                          qkv_p.input_scale)
        qkv = qkv_p.gemm(xq, s)  # [T, q_size + 2 * kv_size], scaled (+ bias)
        q, k, v = (y.view(t, -1, a.head_dim)
                   for y in qkv.split([a.q_size, a.kv_size, a.kv_size], dim=-1))
        fi = fused_kernels(qkv)
        q, k = rope(positions, q, k) if fi is None else _rope_fused(fi, rope, positions, q, k)
        attn = plan.forward(layer, q, k, v, kv_cache).reshape(t, a.q_size)
        if rows is not None:
            attn, residual = attn[rows], residual[rows]
        # residual += o_proj(attn); xq = quantize(post_attn_norm(residual))
        xq, s, residual = fp8_fusion.add_rmsnorm_quantize(
            fp8_fusion.project(o_p, *o_p.quantize_input(attn)), residual, self.post_attn_norm,
            gate_up_p.input_scale)
        xq, s = fp8_fusion.silu_mul_quantize(fp8_fusion.project(gate_up_p, xq, s),
                                             down_p.input_scale)
        return fp8_fusion.project(down_p, xq, s), residual


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
                kv_caches: list[torch.Tensor], plan: AttentionPlan,
                on_layer: Callable[[int], None] | None = None,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids, positions [T] -> final hidden states [R, H] (normed) of `rows` (indices
        into T, in their order; all T rows if None).

        `plan` is this step's attention plan (`AttentionBackend.plan`), run once per layer.
        `on_layer(i)` runs after layer i (its KV is in kv_caches[i] by then). Every layer writes
        the K/V of all T tokens; only the last one's output projection and MLP are cut to
        `rows`: a prefill chunk samples from its last token alone, and that layer's work on
        the other tokens is read by nothing (1 / num_layers of a prompt's projections after
        attention and MLPs).
        """
        hidden = self.embed_tokens(input_ids)  # [T, H]
        if rows is not None and not self.layers:
            hidden = hidden[rows]
        residual = None
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            hidden, residual = layer(i, hidden, residual, positions, self.rope, plan,
                                     kv_caches[i], rows if i == last else None)
            if on_layer is not None:
                on_layer(i)
        return self.final_norm(hidden, residual)

    def final_norm(self, hidden: torch.Tensor | Pending,
                   residual: torch.Tensor | None) -> torch.Tensor:
        """norm(residual + hidden) [T, H]: the last layer's output, normed (one kernel on the
        GPU, which leaves the sum in `residual` and the normed states in `hidden`)."""
        if residual is None:  # a model without layers
            return self.norm(hidden)
        if isinstance(hidden, Pending):
            hidden = hidden.value(residual.dtype)
        fi = fused_kernels(hidden)
        if fi is None:
            return self.norm(residual + hidden)
        fi.norm.fused_add_rmsnorm(hidden, residual, self.norm.weight, self.norm.eps)
        return hidden

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, H] -> [N, vocab] float32."""
        return gemv.linear(self.lm_head, hidden).float()
