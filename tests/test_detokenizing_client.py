"""DetokenizingClient over a stand-in upstream that streams token ids only: whatever the grouping
of tokens into outputs, tokens, text, finish reason, logprobs and counts equal what the engine's
own detokenizer makes (`LLM.generate`), stop strings included (with and without the stop string
in the output, multi-byte ones, ones ending at the last token); the upstream stream is closed
as soon as a stop string ends the request."""

from __future__ import annotations

import pytest

from api.detokenizing_client import DetokenizingClient
from engine.llm import LLM, Completion
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams

pytestmark = pytest.mark.anyio
PROMPT = "Once upon a time, the lighthouse keeper"
GREEDY = dict(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=1)
SEEDED = dict(max_tokens=40, temperature=1.5, top_k=0, seed=5, ignore_eos=True, logprobs=1)


class Upstream:
    """Streams one completion's tokens, `k` per output, as an engine with detokenize=False."""

    def __init__(self, c: Completion, k: int) -> None:
        n = len(c.token_ids)
        self.outputs = [RequestOutput(
            "r", c.token_ids[i:i + k], "", i + k >= n, c.finish_reason if i + k >= n else None,
            c.logprobs[i:i + k], len(c.prompt_token_ids), min(i + k, n))
            for i in range(0, n, k)]
        self.sent, self.closed = 0, False

    async def generate(self, prompt_ids, params, request_id):
        try:
            for out in self.outputs:
                self.sent += 1
                yield out
        finally:
            self.closed = True


async def run(client: DetokenizingClient, upstream: Upstream, prompt_ids: list[int],
              params: SamplingParams) -> tuple[list[int], str, str | None, list, int]:
    ids, text, reason, lps, count = [], "", None, [], 0
    async for out in client.generate(prompt_ids, params, "r"):
        assert not out.finished or upstream.closed  # closed before the last output is out
        ids += out.new_token_ids
        text += out.new_text
        lps += [(lp.token_id, lp.logprob) for lp in out.new_logprobs]
        reason, count = out.finish_reason, out.num_output_tokens
    return ids, text, reason, lps, count


def cases(llm: LLM) -> list[tuple[dict, list[str], bool]]:
    greedy = llm.generate(PROMPT, SamplingParams(**GREEDY))[0].text
    seeded = llm.generate(PROMPT, SamplingParams(**SEEDED))[0].text
    wide = next(i for i, c in enumerate(seeded) if ord(c) > 127)
    return [(GREEDY, [], False), (SEEDED, [], False)] + [
        (kw, stop, include)
        for kw, stop in [(GREEDY, [greedy[6:10]]), (GREEDY, [greedy[1:3], greedy[2:9]]),
                         (GREEDY, [greedy[-3:]]), (SEEDED, [seeded[wide:wide + 2]]),
                         (SEEDED, [seeded[wide - 1:wide + 1], "zz"])]
        for include in (False, True)]


@pytest.mark.parametrize("k", [1, 2, 3, 7, 100])
async def test_text_and_stops_equal_the_engine_for_any_grouping(llm: LLM, k: int) -> None:
    prompt_ids = llm.tokenizer.encode(PROMPT)
    for kw, stop, include in cases(llm):
        plain = llm.generate(prompt_ids, SamplingParams(**kw))[0]  # what the upstream runs
        params = SamplingParams(**kw, stop=stop, include_stop_str_in_output=include)
        ref = llm.generate(prompt_ids, params)[0]  # the engine's own detokenizer
        upstream = Upstream(plain, k)
        got = await run(DetokenizingClient(upstream, llm.tokenizer), upstream, prompt_ids,
                        params)
        want = (ref.token_ids, ref.text, ref.finish_reason,
                [(lp.token_id, lp.logprob) for lp in ref.logprobs], len(ref.token_ids))
        assert got == want, (kw, stop, include)
        assert upstream.closed
        if ref.finish_reason == "stop":  # ended in the API: the rest was never read
            assert upstream.sent == -(-len(ref.token_ids) // k)


async def test_stop_string_ending_at_the_last_token_keeps_the_upstream_reason(llm: LLM) -> None:
    prompt_ids = llm.tokenizer.encode(PROMPT)
    greedy = llm.generate(prompt_ids, SamplingParams(**GREEDY))[0]
    stop = greedy.text[6:10]
    n = len(llm.generate(prompt_ids, SamplingParams(**GREEDY, stop=[stop]))[0].token_ids)
    kw = {**GREEDY, "max_tokens": n}  # max_tokens ends the request where the stop string does
    params = SamplingParams(**kw, stop=[stop])
    ref = llm.generate(prompt_ids, params)[0]
    upstream = Upstream(llm.generate(prompt_ids, SamplingParams(**kw))[0], 2)
    got = await run(DetokenizingClient(upstream, llm.tokenizer), upstream, prompt_ids, params)
    assert ref.finish_reason == "length" and got[:3] == (ref.token_ids, ref.text, "length")


async def test_without_a_tokenizer_outputs_pass_through(llm: LLM) -> None:
    c = llm.generate(PROMPT, SamplingParams(**GREEDY))[0]
    upstream = Upstream(c, 3)
    client = DetokenizingClient(upstream, None)
    params = SamplingParams(**GREEDY, stop=[c.text[6:10]])
    got = [out async for out in client.generate(c.prompt_token_ids, params, "r")]
    assert got == upstream.outputs and all(o.new_text == "" for o in got)
