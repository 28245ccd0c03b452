"""The tiny model on the GPU: greedy tokens agree between the torch and flashinfer backends.

The tiny llama is made with head_dim 64 (FlashInfer has no 32-wide kernels). Both runs use
bf16 and the same fused GPU kernels around attention, so only the attention
backend differs (and, with `cuda_graphs`, eager launches vs graph replays). The tiny model's
wide lm_head gives clear top-1 margins, so bf16 rounding does not flip its greedy choices.
"""

from __future__ import annotations

import random

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
pytest.importorskip("flashinfer")

from engine.llm import LLM  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402

pytestmark = pytest.mark.gpu

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
COMMON = dict(device="cuda", dtype="bfloat16", num_pages=512, max_num_seqs=16)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> str:
    """The tiny llama with 64-wide heads: FlashInfer's kernels have no 32-wide variant."""
    import engine.tiny_model as tiny

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tiny, "HEAD_DIM", 64)
        return str(tiny.make_tiny_model(tmp_path_factory.mktemp("gpu-models") / "tiny-llama"))


def _prompts(seed: int, n: int = 6) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(6, 1900) for _ in range(rng.randint(3, 80))] for _ in range(n)]


def _generate(path: str, prompts, **kwargs) -> list[list[int]]:
    llm = LLM(path, **COMMON, **kwargs)
    try:
        return [c.token_ids for c in llm.generate(prompts, GREEDY)]
    finally:
        del llm
        torch.cuda.empty_cache()


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_greedy_agrees_with_torch_backend(tiny_path, cuda_graphs):
    prompts = _prompts(0)
    ref = _generate(tiny_path, prompts, attention_backend="torch")
    got = _generate(tiny_path, prompts, attention_backend="flashinfer", cuda_graphs=cuda_graphs)
    assert got == ref


def test_greedy_agrees_under_chunked_prefill(tiny_path):
    prompts = _prompts(1)
    ref = _generate(tiny_path, prompts, attention_backend="torch", max_num_batched_tokens=24)
    got = _generate(tiny_path, prompts, attention_backend="flashinfer",
                    max_num_batched_tokens=24)
    assert got == ref


def test_cascade_on_shared_prefix_agrees(tiny_path):
    """Requests that share cached prefix pages decode through the cascade wrapper."""
    rng = random.Random(2)
    prefix = [rng.randrange(6, 1900) for _ in range(100)]
    prompts = [prefix + [rng.randrange(6, 1900) for _ in range(rng.randint(1, 20))]
               for _ in range(5)]

    def run(backend: str, cascade: str, graphs: bool = False):
        llm = LLM(tiny_path, **COMMON, attention_backend=backend, cascade=cascade,
                  cuda_graphs=graphs)
        llm.generate(prompts[:1], GREEDY)  # caches the prefix pages
        out = [c.token_ids for c in llm.generate(prompts, GREEDY)]
        steps = llm.engine.runner.num_cascade_steps
        del llm
        torch.cuda.empty_cache()
        return out, steps

    ref, _ = run("torch", "off")
    got, steps = run("flashinfer", "on")
    assert steps > 0
    assert got == ref
    got_graphs, _ = run("flashinfer", "off", graphs=True)
    assert got_graphs == ref
