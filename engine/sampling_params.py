"""One sampling-parameter dataclass for every API (OpenAI and TGI map onto it)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: no logprobs; n >= 0: chosen token + top-n alternatives
    # The same for every prompt token (OpenAI's echo, TGI's decoder_input_details), computed
    # where the prompt runs; the first prompt token has none (nothing precedes it).
    prompt_logprobs: int | None = None
    include_stop_str_in_output: bool = False
    # Output tokens an earlier attempt generated, now at the end of the prompt (a request
    # resumed on another replica after a failure): seeded draws continue at their positions.
    resumed_tokens: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)
        self.validate()

    def validate(self) -> None:
        def bad(msg: str) -> None:
            raise ValueError(msg)

        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            bad(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not (0.0 <= float(self.temperature) <= 100.0):
            bad(f"temperature must be in [0, 100], got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            bad(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not (0.0 < float(self.top_p) <= 1.0):
            bad(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not (0.0 < float(self.repetition_penalty) <= 10.0):
            bad(f"repetition_penalty must be in (0, 10], got {self.repetition_penalty!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            bad(f"seed must be a non-negative integer, got {self.seed!r}")
        if self.logprobs is not None and (not isinstance(self.logprobs, int)
                                          or not 0 <= self.logprobs <= 20):
            bad(f"logprobs must be an integer in [0, 20], got {self.logprobs!r}")
        if self.prompt_logprobs is not None and (not isinstance(self.prompt_logprobs, int)
                                                 or not 0 <= self.prompt_logprobs <= 20):
            bad(f"prompt_logprobs must be an integer in [0, 20], got {self.prompt_logprobs!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop strings must be non-empty strings")
        if len(self.stop) > 16:
            bad(f"at most 16 stop strings, got {len(self.stop)}")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            bad("stop_token_ids must be non-negative integers")
        if not isinstance(self.resumed_tokens, int) or self.resumed_tokens < 0:
            bad(f"resumed_tokens must be an integer >= 0, got {self.resumed_tokens!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1
