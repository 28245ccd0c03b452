"""Which linear layers run in fp8, and how an fp8 checkpoint's tensors land in them.

The fp8 scheme comes from the checkpoint's config.json `quantization_config` when it has one
(pre-quantized: llm-compressor's compressed-tensors "float-quantized" format, the "FP8" and
"FP8-Dynamic" schemes, or the older `quant_method: fp8` layout), else from `quantize: fp8`
(bf16/fp16 weights quantized at load). Checkpoint layout per quantized linear layer:
`<module>.weight` float8_e4m3fn [N, K], `<module>.weight_scale` float32 per tensor ([] or [1])
or per channel ([N, 1]), and `<module>.input_scale` [] / [1] for static activation scales.

Our q/k/v (gate/up) live in one fused layer, so scales become per output channel here: a
shard's per-tensor scale is repeated over its rows, and the shards' static input scales (one
input, three scales) merge into their maximum. Decoder linears are quantized; embeddings and,
unless the checkpoint quantized it, lm_head stay in the model dtype.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from engine.checkpoint_names import LAYER_LINEARS
from engine.config import ModelConfig
from engine.fp8_linear import FP8, Fp8Linear
from engine.model_arch import ModelArch

SCALE_SUFFIXES = ("weight_scale", "input_scale")
# Calibrated KV-cache scales of a checkpoint: pdserve's fp8 KV uses scale 1.0 (docs/fp8.md).
KV_SCALE_NAMES = re.compile(r".*self_attn\.(k_scale|v_scale|kv_scale)$")


@dataclass(frozen=True)
class Fp8Scheme:
    prequantized: bool  # the checkpoint holds fp8 weights (else: quantize at load)
    static_input_scale: bool  # activations use the checkpoint's input_scale, not per token
    ignore: tuple[str, ...] = ("lm_head",)  # checkpoint module names ("re:" = regex) left alone

    def ignores(self, module: str) -> bool:
        for pattern in self.ignore:
            if pattern.startswith("re:"):
                if re.fullmatch(pattern[3:], module):
                    return True
            elif pattern == module:
                return True
        return False


QUANTIZE_AT_LOAD = Fp8Scheme(prequantized=False, static_input_scale=False)


def _unsupported(path: Path, why: str) -> ValueError:
    return ValueError(f"{path}/config.json: quantization_config {why}; pdserve loads fp8 "
                      "checkpoints (compressed-tensors float-quantized 8-bit weights, or "
                      "quant_method fp8 without weight_block_size) and bf16/fp16 ones")


def checkpoint_scheme(path: str | Path) -> Fp8Scheme | None:
    """The fp8 scheme of the checkpoint at `path`; None if it is not quantized. A quantized
    checkpoint that is not fp8 (GPTQ, AWQ, int8, fp8 blocks, ...) is a ValueError."""
    path = Path(path)
    cfg_file = path / "config.json"
    qc = json.loads(cfg_file.read_text()).get("quantization_config") if cfg_file.is_file() \
        else None
    if not qc:
        return None
    method = qc.get("quant_method")
    if method == "fp8":  # the older layout: per-tensor scales, `activation_scheme`
        if qc.get("weight_block_size"):
            raise _unsupported(path, "has block-wise fp8 scales (weight_block_size)")
        return Fp8Scheme(True, qc.get("activation_scheme", "dynamic") == "static",
                         tuple(qc.get("ignored_layers") or ("lm_head",)))
    if method != "compressed-tensors":
        raise _unsupported(path, f"has quant_method {method!r}")
    if qc.get("format") not in ("float-quantized", "naive-quantized"):
        raise _unsupported(path, f"has format {qc.get('format')!r}")
    groups = list((qc.get("config_groups") or {}).values())
    if len(groups) != 1:
        raise _unsupported(path, f"has {len(groups)} config_groups (one is supported)")
    weights, acts = groups[0].get("weights") or {}, groups[0].get("input_activations")
    if weights.get("type") != "float" or weights.get("num_bits") != 8 \
            or weights.get("strategy") not in ("tensor", "channel"):
        raise _unsupported(path, f"quantizes weights as {weights} (fp8 per tensor or per "
                                 "channel is supported)")
    if not acts or acts.get("type") != "float" or acts.get("num_bits") != 8:
        raise _unsupported(path, "leaves activations unquantized (weight-only fp8)")
    static = not acts.get("dynamic", False)
    if static and acts.get("strategy") != "tensor":
        raise _unsupported(path, f"has static activation scales per {acts.get('strategy')}")
    return Fp8Scheme(True, static, tuple(qc.get("ignore") or ()))


def fp8_scheme(cfg: ModelConfig) -> Fp8Scheme | None:
    """The scheme the model loads with: the checkpoint's own, else `quantize: fp8`'s, else None
    (the checkpoint is read as-is when load_format is dummy too: its shapes, its scheme)."""
    scheme = checkpoint_scheme(cfg.path)
    if scheme is not None:
        return scheme
    return QUANTIZE_AT_LOAD if cfg.quantize == "fp8" else None


def fp8_module_names(arch: ModelArch, scheme: Fp8Scheme) -> list[str]:
    """Our module names that run in fp8 under `scheme`."""
    names = []
    for i in range(arch.num_layers):
        for ours, parts in LAYER_LINEARS.items():
            modules = [ckpt for ckpt, _ in parts]
            flags = {scheme.ignores(f"model.layers.{i}.{ckpt}") for ckpt in modules}
            if len(flags) > 1:
                raise ValueError(f"quantization_config.ignore covers only some of {modules} in "
                                 f"layer {i}; they run fused, so all or none must be fp8")
            if not flags.pop():
                names.append(f"layers.{i}.{ours}")
    if scheme.prequantized and not scheme.ignores("lm_head") and not arch.tie_word_embeddings:
        names.append("lm_head")  # the checkpoint says lm_head is fp8 too
    return names


def swap_fp8_modules(model: nn.Module, names: list[str], scheme: Fp8Scheme) -> None:
    """Replace each named nn.Linear: quantized from its weights (quantize at load), or an empty
    Fp8Linear that the checkpoint fills (pre-quantized)."""
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear: nn.Linear = getattr(parent, attr)
        if scheme.prequantized:
            w = linear.weight
            new = Fp8Linear(linear.in_features, linear.out_features,
                            bias=linear.bias is not None, out_dtype=w.dtype, device=w.device,
                            static_input_scale=scheme.static_input_scale)
        else:
            new = Fp8Linear.from_linear(linear)
        setattr(parent, attr, new)  # the bf16 weight is freed with the old module


def split_scale_name(name: str) -> tuple[str, str] | None:
    """`x.weight_scale` -> (`x.weight`, "weight_scale"); None for other names."""
    for suffix in SCALE_SUFFIXES:
        if name.endswith("." + suffix):
            return name[: -len(suffix)] + "weight", suffix
    return None


def place_scale(dest: torch.Tensor, tensor: torch.Tensor, suffix: str, ckpt_name: str) -> None:
    """Copy a checkpoint scale into `dest`: weight_scale rows [n] (from [], [1] or [n, 1]), or
    the module's one input_scale [] (the maximum over the fused shards)."""
    t = tensor.to(dest.device, torch.float32).reshape(-1)
    if suffix == "input_scale":
        if t.numel() != 1:
            raise ValueError(f"{ckpt_name}: static input scales must be per tensor, got "
                             f"{tuple(tensor.shape)}")
        dest.copy_(torch.maximum(dest, t[0]))
        return
    if t.numel() == 1:
        dest.copy_(t.expand(dest.shape))  # per tensor: every row of this shard
    elif t.numel() == dest.numel():
        dest.copy_(t)
    else:
        raise ValueError(f"{ckpt_name}: {tuple(tensor.shape)} scales for {dest.numel()} output "
                         "channels (per-tensor or per-channel scales are supported)")


def check_fp8_dtype(dest: torch.Tensor, tensor: torch.Tensor, ckpt_name: str) -> None:
    """A quantized module takes fp8 weights only, and a kept one none."""
    if (dest.dtype == FP8) != (tensor.dtype == FP8):
        want = "float8_e4m3fn" if dest.dtype == FP8 else f"{dest.dtype} (not quantized here)"
        raise ValueError(f"{ckpt_name}: checkpoint dtype {tensor.dtype}, expected {want}; check "
                         "quantization_config.ignore in config.json")
