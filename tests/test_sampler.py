"""Sampler: greedy == argmax, seeded draws are stateless, filters never leak, logprobs are raw."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor

from engine.request import Request
from engine.sampler import Sampler, seeded_uniform
from engine.sampling_params import SamplingParams

V = 64


def req(outputs: list[int] | None = None, prompt: list[int] | None = None, **kw) -> Request:
    return Request("r", prompt or [1, 2, 3], SamplingParams(**kw), list(outputs or []))


def rand_logits(b: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, V, generator=g) * scale


def nucleus(probs: list[float], top_p: float) -> set[int]:
    """Reference nucleus in plain Python: the shortest prefix of the sorted tokens reaching p."""
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    kept, mass = set(), 0.0
    for i in order:
        kept.add(i)
        mass += probs[i]
        if mass >= top_p:
            break
    return kept


def test_greedy_is_argmax() -> None:
    logits = rand_logits(8)
    logits[3, 10] = logits[3, 20] = logits[3].max() + 1  # a tie: argmax takes the first
    out = Sampler().sample(logits, [req(temperature=0.0) for _ in range(8)])
    assert out.token_ids == torch.argmax(logits, dim=-1).tolist()
    assert out.token_ids[3] == 10
    assert out.logprobs == [None] * 8


def test_top_k_1_is_greedy_whatever_the_temperature() -> None:
    logits = rand_logits(8, seed=1)
    rs = [req(top_k=1, temperature=5.0) for _ in range(8)]
    assert Sampler().sample(logits, rs).token_ids == logits.argmax(-1).tolist()


def test_repetition_penalty_matches_hf_and_changes_argmax() -> None:
    logits = torch.zeros(2, V)
    logits[:, 5] = 2.0  # seen, positive: 2.0 / 2 = 1.0
    logits[:, 6] = 1.5  # unseen: stays 1.5 and wins
    logits[:, 7] = -1.0  # seen, negative: -1.0 * 2 = -2.0
    rs = [req(prompt=[5, 7], outputs=[5], temperature=0.0, repetition_penalty=2.0),
          req(prompt=[5, 7], temperature=0.0)]
    out = Sampler().sample(logits.clone(), rs)
    assert out.token_ids == [6, 5]

    # Many random rows, histories and penalties: the greedy pick is HF's, token for token.
    rng = torch.Generator().manual_seed(2)
    scores = rand_logits(200, seed=2, scale=1.0)
    rs = []
    for b in range(200):
        hist = torch.randint(0, V, (12,), generator=rng).tolist()
        pen = [0.5, 0.9, 1.2, 2.0, 4.0][b % 5]
        rs.append(req(prompt=hist[:7], outputs=hist[7:], temperature=0.0, repetition_penalty=pen))
    want = [
        int(RepetitionPenaltyLogitsProcessor(r.params.repetition_penalty)(
            torch.tensor([r.all_token_ids]), scores[b : b + 1].clone()).argmax())
        for b, r in enumerate(rs)
    ]
    assert Sampler().sample(scores, rs).token_ids == want
    assert want != scores.argmax(-1).tolist()  # the penalty really moved some picks


def test_repetition_penalty_ignores_ids_outside_the_logits() -> None:
    logits = torch.zeros(2, V)
    logits[:, 0] = 1.0
    logits[:, 1] = 0.9
    # Id V would be row 1's token 0 in a flattened [B * V] mask; it must not leak there.
    rs = [req(prompt=[V, V + 5], temperature=0.0, repetition_penalty=2.0),
          req(prompt=[7], temperature=0.0, repetition_penalty=2.0)]
    assert Sampler().sample(logits, rs).token_ids == [0, 0]


def test_same_seed_same_tokens_and_draw_depends_only_on_seed_and_step() -> None:
    logits = torch.zeros(1, V)  # uniform: any difference in the draw shows in the token
    s = Sampler()

    def draw(seed: int, outputs: list[int], prompt: list[int] | None = None) -> int:
        return s.sample(logits, [req(outputs, prompt, seed=seed)]).token_ids[0]

    seq = [draw(7, [0] * n) for n in range(40)]
    assert seq == [draw(7, [0] * n) for n in range(40)]
    assert len(set(seq)) > 10  # the step moves the draw
    # Other history, other prompt, other batch position: same (seed, step) -> same token.
    assert draw(7, [3, 1, 4], prompt=[9, 9]) == seq[3]
    batch = [req([1] * 5, seed=1), req([2, 2, 2], seed=7), req(seed=7)]
    assert s.sample(logits.expand(3, V), batch).token_ids[1:] == [seq[3], seq[0]]
    assert seq != [draw(8, [0] * n) for n in range(40)]
    # Uniform logits: the token is exactly floor(u * V) of the stateless uniform.
    assert seq == [math.floor(seeded_uniform(7, n) * V) for n in range(40)]


def test_seeded_rows_leave_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    Sampler().sample(rand_logits(4), [req(seed=i) for i in range(4)])
    assert torch.equal(torch.rand(3), expected)


def test_unseeded_rows_follow_the_global_rng() -> None:
    logits = rand_logits(16, scale=0.5)
    rs = [req() for _ in range(16)]
    torch.manual_seed(5)
    a = Sampler().sample(logits, rs).token_ids
    torch.manual_seed(5)
    assert Sampler().sample(logits, rs).token_ids == a


def test_top_p_never_leaves_the_nucleus() -> None:
    torch.manual_seed(0)
    row = torch.linspace(4.0, -4.0, V)[torch.randperm(V)]  # distinct, well-separated masses
    for top_p, temp in [(0.5, 1.0), (0.9, 1.0), (0.3, 0.7), (0.95, 2.0)]:
        probs = torch.softmax(row.double() / temp, -1).tolist()
        allowed = nucleus(probs, top_p)
        n = 4000
        out = Sampler().sample(row.expand(n, V), [req(top_p=top_p, temperature=temp)] * n)
        assert set(out.token_ids) == allowed, (top_p, temp)  # inside, and all of it reached


def test_top_p_keeps_the_top_token_even_when_it_alone_exceeds_p() -> None:
    row = torch.full((1, V), -10.0)
    row[0, 42] = 10.0
    rs = [req(top_p=0.01, seed=i) for i in range(50)]
    assert Sampler().sample(row.expand(50, V), rs).token_ids == [42] * 50


def test_top_k_never_leaves_the_top_k() -> None:
    torch.manual_seed(1)
    row = torch.randn(V)
    for k in (2, 5, 17):
        allowed = set(row.topk(k).indices.tolist())
        n = 3000
        out = Sampler().sample(row.expand(n, V), [req(top_k=k, temperature=3.0)] * n)
        assert set(out.token_ids) == allowed


def test_top_k_then_top_p_renormalises_over_the_top_k() -> None:
    row = torch.log(torch.tensor([0.4, 0.3, 0.2, 0.1] + [1e-3] * (V - 4)))
    n = 3000
    # After top-4 the masses are ~[.404, .303, .202, .101]; top_p = .6 needs the first two.
    out = Sampler().sample(row.expand(n, V), [req(top_k=4, top_p=0.6)] * n)
    assert set(out.token_ids) == {0, 1}


def test_draw_frequencies_follow_the_distribution() -> None:
    torch.manual_seed(2)
    target = torch.tensor([0.5, 0.3, 0.15, 0.05])
    n = 20000
    out = Sampler().sample(target.log().expand(n, 4), [req()] * n)
    freq = torch.bincount(torch.tensor(out.token_ids), minlength=4).double() / n
    assert torch.allclose(freq, target.double(), atol=0.015), freq


def test_logprobs_are_the_raw_log_softmax_with_sorted_top_n() -> None:
    logits = rand_logits(3, seed=4)
    rs = [req(temperature=0.0, logprobs=5, repetition_penalty=3.0, prompt=[1, 2]),
          req(temperature=0.3, top_k=3, logprobs=0, seed=11),
          req(temperature=0.0)]
    out = Sampler().sample(logits, rs)
    ref = torch.log_softmax(logits.double(), -1)
    for b in (0, 1):
        lp = out.logprobs[b]
        assert lp is not None and lp.token_id == out.token_ids[b]
        assert lp.logprob == pytest.approx(ref[b, lp.token_id].item(), abs=1e-5)
    top = out.logprobs[0].top
    assert [t for t, _ in top] == ref[0].topk(5).indices.tolist()
    assert [v for _, v in top] == sorted((v for _, v in top), reverse=True)
    for t, v in top:
        assert v == pytest.approx(ref[0, t].item(), abs=1e-5)
    assert out.logprobs[1].top == []
    assert out.logprobs[2] is None


def test_mixed_batch_rows_match_their_single_row_results() -> None:
    logits = rand_logits(6, seed=9, scale=1.0)
    rs = [req(temperature=0.0),
          req(seed=3, top_k=8, outputs=[4, 4]),
          req(seed=4, top_p=0.8, temperature=0.5, logprobs=2),
          req(top_k=1, repetition_penalty=1.3, prompt=[int(logits[3].argmax())]),
          req(seed=5, temperature=1.5, repetition_penalty=0.8, logprobs=1),
          req(seed=6)]
    s = Sampler()
    batch = s.sample(logits, rs)
    for b, r in enumerate(rs):
        single = s.sample(logits[b : b + 1], [r])
        assert batch.token_ids[b] == single.token_ids[0]
        assert batch.logprobs[b] == single.logprobs[0]
    assert batch.token_ids[0] == int(logits[0].argmax())
    hf = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([rs[3].all_token_ids]), logits[3:4])
    assert batch.token_ids[3] == int(hf.argmax())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.filterwarnings("ignore:Synchronization debug mode is a prototype")
def test_cuda_matches_cpu_and_syncs_once() -> None:
    logits = rand_logits(5, seed=3)
    rs = [req(temperature=0.0, logprobs=3), req(seed=1, top_p=0.9),
          req(seed=2, top_k=5, repetition_penalty=1.2), req(seed=3, logprobs=0),
          req(top_k=1)]
    cpu = Sampler().sample(logits, rs)
    on_gpu = logits.cuda()
    Sampler().sample(on_gpu, rs)  # first use initialises CUDA state; not a step's cost
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with pytest.warns(UserWarning) as rec:
            gpu = Sampler().sample(on_gpu, rs)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert sum("synchroniz" in str(w.message) for w in rec) == 1
    assert gpu.token_ids == cpu.token_ids
    for a, b in zip(gpu.logprobs, cpu.logprobs, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.token_id == b.token_id and a.logprob == pytest.approx(b.logprob, abs=1e-5)
