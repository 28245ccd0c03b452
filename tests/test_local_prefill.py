"""A decode replica prefills a prompt itself when at most `local_prefill_max_tokens` of its
tokens are not in its prefix cache; longer ones still go to a prefill replica. Tokens equal the
colocated engine's either way, and no page is left behind."""

from __future__ import annotations

import asyncio

import pytest

from decode.worker import DecodeWorker
from engine.llm import LLM
from engine.metrics import LOCAL_PREFILL_TTFT
from engine.sampling_params import SamplingParams
from serving.config import AppConfig
from tests.test_disaggregated_inprocess import (
    inline_pair,
    leave_after_first_output,
    no_pages_left,
)
from tests.test_token_path import RecordingSink

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
SHARED = list(range(100, 164))  # 4 full pages of 16


async def _tokens(decode: DecodeWorker, prompt: list[int], rid: str) -> list[int]:
    return [t async for out in decode.generate(prompt, GREEDY, rid) for t in out.new_token_ids]


def _count(worker, name: str) -> float:
    return worker.metrics.counters.get(name, 0)


def test_short_prompts_prefill_on_the_decode_replica_long_ones_remotely(tiny_llama):
    short, long = list(range(300, 316)), list(range(400, 417))  # 16 and 17 tokens

    async def main():
        prefill, decode = inline_pair(tiny_llama, local_prefill_max_tokens=16)
        got_short = await _tokens(decode, short, "short")
        assert _count(prefill, "pdserve_requests_total") == 0
        assert _count(decode, "pdserve_kv_transfer_bytes_total") == 0
        got_long = await _tokens(decode, long, "long")
        return prefill, decode, got_short, got_long

    prefill, decode, got_short, got_long = asyncio.run(main())
    ref = LLM(tiny_llama, num_pages=128).generate([short, long], GREEDY)
    assert (got_short, got_long) == (ref[0].token_ids, ref[1].token_ids)
    assert _count(prefill, "pdserve_requests_total") == 1  # the long one only
    assert _count(decode, "pdserve_local_prefills_total") == 1
    assert _count(decode, "pdserve_kv_transfer_bytes_total") > 0
    assert _count(decode, "pdserve_prompt_tokens_total") == 16 + 17
    # both first tokens timed; the local one also apart, for the SLO autoscaler
    assert decode.metrics.histograms["pdserve_ttft_seconds"].count == 2
    assert decode.metrics.histograms[LOCAL_PREFILL_TTFT].count == 1
    no_pages_left(prefill, decode)


def test_through_an_output_sink_every_output_passes_and_the_first_is_timed_once(tiny_llama):
    prompt = list(range(300, 316))

    async def main():
        prefill, decode = inline_pair(tiny_llama, local_prefill_max_tokens=16)
        sink = RecordingSink()
        streamed = [out async for out in decode.generate(prompt, GREEDY, "s", sink=sink)]
        return prefill, decode, sink, streamed

    prefill, decode, sink, streamed = asyncio.run(main())
    ref = LLM(tiny_llama, num_pages=128).generate([prompt], GREEDY)[0].token_ids
    outs = [out for batch in sink.batches for out in batch] + sink.pending
    assert [t for out in outs for t in out.new_token_ids] == ref
    assert len(streamed) == 1 and streamed[0].finished  # the stream gets only the last one
    assert decode.metrics.histograms[LOCAL_PREFILL_TTFT].count == 1
    no_pages_left(prefill, decode)


def test_a_new_turn_on_a_cached_history_prefills_locally(tiny_llama):
    """The limit counts the tokens the decode replica's prefix cache lacks: 64 cached + 10 new
    is a local prefill under a limit of 16, though the prompt has 74 tokens."""
    first, turn = SHARED + [7, 8, 9], SHARED + list(range(20, 30))

    async def main():
        prefill, decode = inline_pair(tiny_llama, local_prefill_max_tokens=16)
        assert decode.engine.cached_prefix_tokens(turn) == 0
        got_first = await _tokens(decode, first, "first")  # 67 uncached: a prefill replica's
        moved = _count(decode, "pdserve_kv_transfer_bytes_total")
        assert decode.engine.cached_prefix_tokens(turn) == 64
        got_turn = await _tokens(decode, turn, "turn")
        return prefill, decode, got_first, got_turn, moved

    prefill, decode, got_first, got_turn, moved = asyncio.run(main())
    ref = LLM(tiny_llama, num_pages=128).generate([first, turn], GREEDY)
    assert (got_first, got_turn) == (ref[0].token_ids, ref[1].token_ids)
    assert _count(prefill, "pdserve_requests_total") == 1
    assert _count(decode, "pdserve_local_prefills_total") == 1
    assert _count(decode, "pdserve_kv_transfer_bytes_total") == moved  # nothing moved for the turn
    no_pages_left(prefill, decode)


@pytest.mark.parametrize("limit, engine_kwargs, prompts", [
    (0, {}, [[5, 6, 7]]),  # limit 0: even a 3-token prompt
    # Without prefix caching only the length counts: the second prompt's 64 shared tokens are
    # not cached, so 65 tokens need computing, more than 16.
    (16, {"enable_prefix_caching": False}, [SHARED + [1], SHARED + [2]]),
])
def test_these_prompts_all_go_to_the_prefill_replica(tiny_llama, limit, engine_kwargs, prompts):
    async def main():
        prefill, decode = inline_pair(tiny_llama, limit, **engine_kwargs)
        for i, prompt in enumerate(prompts):
            await _tokens(decode, prompt, f"r{i}")
        return prefill, decode

    prefill, decode = asyncio.run(main())
    assert _count(prefill, "pdserve_requests_total") == len(prompts)
    assert _count(decode, "pdserve_local_prefills_total") == 0
    no_pages_left(prefill, decode)


def test_a_client_gone_mid_stream_frees_a_local_prefills_pages(tiny_llama):
    async def main():
        prefill, decode = inline_pair(tiny_llama, local_prefill_max_tokens=32)
        await leave_after_first_output(decode, [3] * 20, "gone")
        await decode.engine.check_integrity()  # queued behind the abort
        return prefill, decode

    prefill, decode = asyncio.run(main())
    assert _count(decode, "pdserve_local_prefills_total") == 1
    no_pages_left(prefill, decode)


def test_the_limit_is_a_decode_key_and_not_negative():
    assert AppConfig.from_args({}).decode.local_prefill_max_tokens == 0
    cfg = AppConfig.from_args({"decode": {"local_prefill_max_tokens": 256}})
    assert cfg.decode.local_prefill_max_tokens == 256
    with pytest.raises(ValueError, match="decode.local_prefill_max_tokens"):
        AppConfig.from_args({"decode": {"local_prefill_max_tokens": -1}})
    with pytest.raises(ValueError, match=r"prefill.local_prefill_max_tokens: unknown key; valid "
                                         r"keys: .*engine"):
        AppConfig.from_args({"prefill": {"local_prefill_max_tokens": 16}})
