"""RequestLimits: what a request must be for an engine to take it, checked before anything is
queued (a ValueError names what is wrong, for the API to answer 400).

Contract: `RequestLimits.max_model_len_for(arch, cfg)` is the context length an engine of that
model and config allows (the config's, capped by the model's); `validate(prompt_ids, params)`
raises ValueError for an empty prompt, one with no room for output, a token id outside the
vocabulary, bad sampling parameters, or a request that would not fit the whole KV pool.
"""

from __future__ import annotations

from engine.config import EngineConfig
from engine.model_arch import ModelArch
from engine.sampling_params import SamplingParams


class RequestLimits:
    def __init__(self, vocab_size: int, max_model_len: int, page_size: int,
                 num_pages: int) -> None:
        self.vocab_size, self.max_model_len = vocab_size, max_model_len
        self.page_size, self.num_pages = page_size, num_pages

    @staticmethod
    def max_model_len_for(arch: ModelArch, cfg: EngineConfig) -> int:
        limit = arch.max_position_embeddings
        if arch.sliding_window:
            # Attention here is full, not windowed: stay where the two are the same.
            limit = min(limit, arch.sliding_window)
        if cfg.max_model_len is not None and cfg.max_model_len > limit:
            raise ValueError(f"max_model_len {cfg.max_model_len} exceeds the model's limit {limit}")
        return cfg.max_model_len or limit

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens but this model allows at "
                             f"most {self.max_model_len} tokens in all (prompt + output)")
        bad = [t for t in prompt_ids if not isinstance(t, int) or not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]!r} is outside the vocabulary "
                             f"[0, {self.vocab_size})")
        params.validate()
        total = min(len(prompt_ids) + params.max_tokens, self.max_model_len)
        if -(-total // self.page_size) > self.num_pages:
            raise ValueError(f"a request of {total} tokens does not fit the KV pool "
                             f"({self.num_pages} pages of {self.page_size})")
