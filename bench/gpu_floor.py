"""The hardware floor that the GPU benchmarks are judged against, measured in the same run.

- copy bandwidth: a large device-to-device copy, counting bytes read plus bytes written;
- bf16 matmul rate: 8192^3 products of random bf16 matrices through torch (cuBLAS).

Also the Llama-3-8B shape (written as a config.json for `load_format="dummy"`) and the byte /
flop counts of its decode and prefill steps. Run alone: `python -m bench.gpu_floor`.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "hidden_act": "silu",
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "torch_dtype": "bfloat16",
}


def llama3_8b_dir(root: str | Path | None = None) -> str:
    """A model directory holding only Llama-3-8B's config.json (weights come from dummy init)."""
    path = Path(root or tempfile.mkdtemp(prefix="llama3-8b-"))
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(LLAMA3_8B, indent=2))
    return str(path)


def cuda_time_ms(fn, reps: int = 20, warmup: int = 3) -> float:
    """Median of `reps` device-timed calls of fn (CUDA events), after `warmup` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def graph_ms(fn, reps: int = 20) -> float:
    """GPU ms of one replay of fn captured in a CUDA graph (after a warm-up call on a side
    stream, where JIT builds, compiles and lazy allocations happen): launches are not timed."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return cuda_time_ms(graph.replay, reps=reps)


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """|got - ref| / |ref| (Frobenius norms, in float32)."""
    return ((got.float() - ref.float()).norm() / ref.float().norm()).item()


def wall_time_ms(fn, reps: int = 5) -> float:
    """Median wall clock of `reps` calls of fn, each until the GPU is done, after one warm-up
    call: for work that includes the host (planning, copies through host memory)."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def emit_row(row: dict, bench: str, out: str | None) -> None:
    """Print one result row as JSON and, with `out`, append it there tagged with its benchmark
    (the JSON lines that bench.gpu_suite collects)."""
    print(json.dumps(row), flush=True)
    if out:
        with open(out, "a") as f:
            f.write(json.dumps({"bench": bench, **row}) + "\n")


@dataclass
class Floor:
    device: str
    copy_bytes_per_s: float  # read + write
    matmul_flops_per_s: float  # bf16, dense

    def __str__(self) -> str:
        return (f"{self.device}: copy {self.copy_bytes_per_s / 1e12:.2f} TB/s (read+write), "
                f"bf16 matmul {self.matmul_flops_per_s / 1e12:.0f} TFLOP/s")


def _copy_bandwidth(gib: float) -> float:
    src = torch.randn(int(gib * 2**30) // 4, device="cuda").to(torch.bfloat16)
    dst = torch.empty_like(src)
    ms = cuda_time_ms(lambda: dst.copy_(src), reps=20)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def _matmul_rate(n: int) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = cuda_time_ms(lambda: a @ b, reps=20, warmup=5)
    return 2 * n**3 / (ms * 1e-3)


def measure_floor(copy_gib: float = 2.0, n: int = 8192) -> Floor:
    floor = Floor(torch.cuda.get_device_name(), _copy_bandwidth(copy_gib), _matmul_rate(n))
    torch.cuda.empty_cache()
    return floor


# -- counts for a Llama-family model ----------------------------------------------------------
def linear_params(arch) -> int:
    """Weights of every per-layer linear layer (q, k, v, o, gate, up, down), all layers."""
    h, q, kv, inter = arch.hidden_size, arch.q_size, arch.kv_size, arch.intermediate_size
    return arch.num_layers * (h * (q + 2 * kv) + q * h + 3 * h * inter)


def kv_bytes_per_token(arch, elem: int = 2) -> int:
    return arch.num_layers * 2 * arch.kv_size * elem


def decode_bytes(arch, kv_lens: list[int], elem: int = 2) -> tuple[int, int]:
    """(weight bytes, KV bytes) a decode step must read at least: every linear weight, the norm
    weights, lm_head, one embedding row per request, and every request's whole KV."""
    h = arch.hidden_size
    weights = (linear_params(arch) + arch.vocab_size * h + (2 * arch.num_layers + 1) * h) * elem
    weights += len(kv_lens) * h * elem  # the embedding rows actually read
    return weights, sum(kv_lens) * kv_bytes_per_token(arch, elem)


def prefill_flops(arch, prompt_lens: list[int]) -> float:
    """Matmul flops of a prefill step from scratch: linear layers for every token, causal
    attention (QK^T and PV, query i seeing i + 1 keys), lm_head for one token per request."""
    tokens = sum(prompt_lens)
    linear = 2 * linear_params(arch) * tokens
    attn = 4 * arch.num_layers * arch.q_size * sum(n * (n + 1) / 2 for n in prompt_lens)
    head = 2 * arch.hidden_size * arch.vocab_size * len(prompt_lens)
    return linear + attn + head


if __name__ == "__main__":
    print(measure_floor())
