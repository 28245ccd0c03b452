"""Admission limits of the HTTP API, named as text-generation-inference's launcher names them.

One frozen dataclass; pydantic validates it as the `limits:` section of the app config (see
serving/config.py) and the API reads it. `max_concurrent_requests` holds for the whole
application, across its ingress replicas (serving/admission_ledger.py); the others hold per
ingress replica.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from pydantic import ConfigDict

from engine.config import ConfigFieldError


@dataclass(frozen=True)
class Limits:
    __pydantic_config__ = ConfigDict(extra="forbid")

    max_concurrent_requests: int = 128  # generation requests being served, cluster-wide
    max_input_tokens: int | None = None  # None: max_total_tokens - 1
    max_total_tokens: int | None = None  # prompt + output; None: the model's max_model_len
    # Prompt tokens admitted but still waiting for their first token; more waits in a queue.
    max_batch_prefill_tokens: int | None = None  # None: no bound
    queue_timeout_s: float = 2.0  # longest wait in that queue before a 429
    max_stop_sequences: int = 4
    max_client_batch_size: int = 32  # prompts in one /v1/completions request
    max_body_bytes: int = 2_000_000  # larger request bodies get a 413
    retry_after_s: int = 1  # the Retry-After header of a 429

    def __post_init__(self) -> None:
        def positive(name: str) -> None:
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigFieldError(name, f"must be > 0, got {value}")

        for name in ("max_concurrent_requests", "max_input_tokens", "max_total_tokens",
                     "max_batch_prefill_tokens", "queue_timeout_s", "max_client_batch_size",
                     "max_body_bytes", "retry_after_s"):
            positive(name)
        if self.max_stop_sequences < 0:
            raise ConfigFieldError("max_stop_sequences",
                                   f"must be >= 0, got {self.max_stop_sequences}")
        if (self.max_input_tokens is not None and self.max_total_tokens is not None
                and self.max_input_tokens >= self.max_total_tokens):
            raise ConfigFieldError("max_input_tokens",
                                   f"must be < max_total_tokens ({self.max_total_tokens}), "
                                   f"got {self.max_input_tokens}")
        if (self.max_input_tokens is not None and self.max_batch_prefill_tokens is not None
                and self.max_input_tokens > self.max_batch_prefill_tokens):
            raise ConfigFieldError("max_batch_prefill_tokens",
                                   f"must be >= max_input_tokens ({self.max_input_tokens}), "
                                   f"got {self.max_batch_prefill_tokens}")

    def resolved(self, max_model_len: int) -> Limits:
        """These limits with the token limits filled in for a model; refuses what exceeds it."""
        total = self.max_total_tokens or max_model_len
        if total > max_model_len:
            raise ValueError(f"limits.max_total_tokens ({total}) exceeds the model's "
                             f"max_model_len ({max_model_len})")
        return replace(self, max_total_tokens=total,
                       max_input_tokens=self.max_input_tokens or total - 1)
