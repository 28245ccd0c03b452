"""Build the model and fill its weights from safetensors (memory-mapped) or at random (dummy).

Checkpoint names map to ours through engine/checkpoint_names.py: q/k/v land in slices of
the fused `qkv_proj`, gate/up in slices of `gate_up_proj`. With fp8 (engine/fp8_checkpoint.py) the
decoder's linear layers become `Fp8Linear`s: quantized after loading, or filled from an fp8
checkpoint's `weight` / `weight_scale` / `input_scale` tensors.
"""

from __future__ import annotations

import json
import re
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open

from engine.checkpoint_names import map_name, shard_rows
from engine.config import ModelConfig
from engine.fp8_checkpoint import (
    KV_SCALE_NAMES,
    QUANTIZE_AT_LOAD,
    check_fp8_dtype,
    fp8_module_names,
    fp8_scheme,
    place_scale,
    split_scale_name,
    swap_fp8_modules,
)
from engine.fp8_linear import Fp8Linear
from engine.model import CausalLM
from engine.model_arch import ModelArch

IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


@contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def load_model(cfg: ModelConfig, arch: ModelArch, max_positions: int) -> CausalLM:
    # Built directly in the target dtype and device: no fp32 copy of a big model on the way.
    with _default_dtype(getattr(torch, cfg.dtype)), torch.device(cfg.device):
        model = CausalLM(arch, max_positions)
    model.rope.float()  # cos/sin tables stay fp32, like the checkpoint's reference code
    scheme = fp8_scheme(cfg)
    if scheme is not None:
        _check_fp8_device(cfg.device)
    fp8_names = fp8_module_names(arch, scheme) if scheme is not None else []
    if cfg.load_format == "dummy":
        # Random weights, quantized like bf16 ones (a pre-quantized config.json included).
        init_dummy_weights(model, cfg.seed)
        if scheme is not None:
            swap_fp8_modules(model, fp8_names, QUANTIZE_AT_LOAD)
    elif scheme is not None and scheme.prequantized:
        swap_fp8_modules(model, fp8_names, scheme)
        load_safetensors(model, Path(cfg.path), arch)
    else:
        load_safetensors(model, Path(cfg.path), arch)
        if scheme is not None:
            swap_fp8_modules(model, fp8_names, scheme)
    if scheme is not None and model.embed_tokens.weight.is_cuda:
        # The replaced bf16 weights sit in the caching allocator, where mem_get_info (which
        # sizes the KV pool) does not count them as free: hand them back.
        torch.cuda.empty_cache()
    return model.eval().requires_grad_(False)


def _check_fp8_device(device: str) -> None:
    """fp8 GEMMs run on CPU (a reference kernel) and on GPUs with fp8 tensor cores (sm89+)."""
    if device.startswith("cuda") and torch.cuda.get_device_capability(device) < (8, 9):
        raise ValueError(f"fp8 weights need an Ada or Hopper GPU (compute capability >= 8.9); "
                         f"{device} is {torch.cuda.get_device_capability(device)}")


def init_dummy_weights(model: CausalLM, seed: int) -> None:
    gen = torch.Generator(device=model.embed_tokens.weight.device).manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.data.fill_(1.0)
        else:
            p.data.normal_(0.0, 0.02, generator=gen)


def checkpoint_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [path / n for n in names]
    elif (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    else:
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{f}: listed in the safetensors index but missing")
    return files


def _load_targets(model: CausalLM) -> dict[str, torch.Tensor]:
    """What a checkpoint fills: the parameters, and each Fp8Linear's weight, scales and bias."""
    targets = dict(model.named_parameters())
    for mod_name, mod in model.named_modules():
        if isinstance(mod, Fp8Linear):
            for buf in ("weight", "weight_scale", "bias", "input_scale"):
                if getattr(mod, buf) is not None:
                    targets[f"{mod_name}.{buf}"] = getattr(mod, buf)
    return targets


def load_safetensors(model: CausalLM, path: Path, arch: ModelArch) -> None:
    params = _load_targets(model)
    # Every (name, rows) a checkpoint must provide; lm_head comes from embed when tied.
    expected: set[tuple[str, str | None]] = set()
    for name in params:
        if "qkv_proj" in name:
            expected |= {(name, s) for s in ("q", "k", "v")}
        elif "gate_up_proj" in name:
            expected |= {(name, s) for s in ("gate", "up")}
        elif not (name == "lm_head.weight" and arch.tie_word_embeddings):
            expected.add((name, None))
    for file in checkpoint_files(path):
        with safe_open(str(file), framework="pt") as f:  # memory-mapped
            for ckpt_name in f.keys():
                scale = split_scale_name(ckpt_name)
                target = map_name(scale[0] if scale else ckpt_name)
                if target is not None and scale:  # x.weight's place, with its scale's suffix
                    target = (target[0].removesuffix("weight") + scale[1], target[1])
                if target is None:
                    if IGNORED.match(ckpt_name) or KV_SCALE_NAMES.match(ckpt_name) or (
                            ckpt_name == "lm_head.weight" and arch.tie_word_embeddings):
                        continue
                    raise ValueError(f"{file.name}: unexpected weight {ckpt_name!r}")
                name, shard = target
                if name not in params:
                    raise ValueError(f"{file.name}: weight {ckpt_name!r} has no place in the "
                                     f"model (mapped to {name!r})")
                dest = params[name].data
                if shard is not None and dest.dim() > 0:  # an input_scale [] is not split
                    dest = dest[shard_rows(arch, shard)]
                tensor = f.get_tensor(ckpt_name)
                if scale:
                    place_scale(dest, tensor, scale[1], ckpt_name)
                    expected.discard((name, shard))
                    continue
                check_fp8_dtype(dest, tensor, ckpt_name)
                if tuple(tensor.shape) != tuple(dest.shape):
                    raise ValueError(f"{file.name}: shape mismatch for {ckpt_name!r}: checkpoint "
                                     f"{tuple(tensor.shape)}, model expects {tuple(dest.shape)}")
                dest.copy_(tensor)
                expected.discard((name, shard))
    if expected:
        missing = sorted(f"{n}[{s}]" if s else n for n, s in expected)
        raise ValueError(f"{path}: checkpoint lacks {len(missing)} weights, e.g. {missing[:5]}")
