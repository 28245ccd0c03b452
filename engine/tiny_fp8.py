"""A pre-quantized fp8 copy of a checkpoint, in the layout llm-compressor publishes
(compressed-tensors, format "float-quantized"): the loader's test fixture for fp8 checkpoints,
made from the tiny model (or any small bf16/fp32 checkpoint).

Each decoder projection `model.layers.i.{self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj}`
becomes `weight` float8_e4m3fn [N, K] + `weight_scale` float32 ([N, 1] per channel, [1] per
tensor), with `input_scale` [1] when activations are static; everything else (embeddings,
norms, lm_head: "ignore") is copied as it is. config.json gains `quantization_config`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from engine.checkpoint_names import LAYER_LINEARS
from engine.fp8_linear import quantize_weight

# the decoder layer's linear weights: what an fp8 checkpoint stores in fp8
_PROJ = re.compile(r"model\.layers\.\d+\.(" + "|".join(
    re.escape(ckpt) for parts in LAYER_LINEARS.values() for ckpt, _ in parts) + r")\.weight$")
STRATEGIES = ("channel", "tensor")


def quantization_config(strategy: str, static_input: bool) -> dict[str, Any]:
    """config.json's `quantization_config` of an FP8 (static) or FP8-Dynamic checkpoint."""
    acts = {"num_bits": 8, "type": "float", "symmetric": True,
            "strategy": "tensor" if static_input else "token", "dynamic": not static_input}
    return {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 8, "type": "float", "symmetric": True, "strategy": strategy,
                        "dynamic": False},
            "input_activations": acts,
        }},
        "ignore": ["lm_head"],
        "kv_cache_scheme": None,
    }


def _quantize(w: torch.Tensor, strategy: str) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (fp8 [N, K], scale [N, 1] per channel or [1] per tensor)."""
    if strategy == "channel":
        wq, scale = quantize_weight(w)
        return wq, scale[:, None]
    wq, scale = quantize_weight(w.reshape(1, -1))  # per tensor: the whole tensor as one channel
    return wq.reshape(w.shape), scale


def make_fp8_checkpoint(src: str | os.PathLike, out_dir: str | os.PathLike,
                        strategy: str = "channel", static_input: bool = False,
                        input_scale: float = 0.05) -> Path:
    """Writes the fp8 copy of the checkpoint at `src` (one model.safetensors) into out_dir.

    `static_input`: activations quantized with a fixed `input_scale` per layer (the "FP8"
    scheme); otherwise per token at run time ("FP8-Dynamic").
    """
    from safetensors.torch import load_file, save

    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    src, out = Path(src), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():  # tokenizer and generation files as they are
        if f.is_file() and f.suffix != ".safetensors" and f.name != "config.json":
            shutil.copyfile(f, out / f.name)
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = quantization_config(strategy, static_input)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tensors: dict[str, torch.Tensor] = {}
    for name, t in load_file(str(src / "model.safetensors")).items():
        if not _PROJ.match(name):
            tensors[name] = t
            continue
        base = name.removesuffix("weight")
        tensors[name], tensors[base + "weight_scale"] = _quantize(t, strategy)
        if static_input:
            tensors[base + "input_scale"] = torch.tensor([input_scale], dtype=torch.float32)
    (out / "model.safetensors").write_bytes(save(tensors, metadata={"format": "pt"}))
    return out
