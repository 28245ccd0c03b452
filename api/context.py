"""What every route shares: the generation client, the tokenizer and the model's length limit.

Prompts are tokenized and their lengths checked here, in the API, so bad input is refused before
anything reaches a replica. Messages state the numbers involved.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Protocol

from api.errors import APIError
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from serving.limits import Limits


class GenerateClient(Protocol):
    """An AsyncEngine, or a Serve handle adapted by api.handle_client.HandleClient.

    `generate` raises ValueError (before its first output) for input the engine refuses;
    closing the iterator early aborts the request and frees its KV pages. Outputs need carry
    only token ids: build_api wraps the client in api.detokenizing_client.DetokenizingClient,
    which sets their text.
    """

    def generate(self, prompt_ids: list[int], params: SamplingParams,
                 request_id: str) -> AsyncIterator[RequestOutput]: ...


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class ServerContext:
    def __init__(self, client: GenerateClient, tokenizer: Any, model_name: str,
                 max_model_len: int, limits: Limits | None = None) -> None:
        self.client, self.tokenizer = client, tokenizer
        self.model_name, self.max_model_len = model_name, max_model_len
        self.limits = (limits or Limits()).resolved(max_model_len)
        self.created = int(time.time())
        # Ids past the tokenizer are either padding rows of the embedding or garbage: refuse.
        self.vocab_size = len(tokenizer)
        self.special_ids = set(tokenizer.all_special_ids)
        self._texts: dict[int, str] = {}

    def check_model(self, name: str | None) -> None:
        """A request naming a model must name this one (None: any)."""
        if name is not None and name != self.model_name:
            raise APIError(f"the model `{name}` does not exist; this server serves "
                           f"`{self.model_name}`", "model", "model_not_found", status=404)

    # -- prompts --------------------------------------------------------------------------
    def encode(self, text: str, param: str = "prompt") -> list[int]:
        if not text:
            raise APIError("the prompt is empty", param)
        try:
            return list(self.tokenizer.encode(text, verbose=False))
        except Exception as e:  # text the tokenizer cannot take is the client's to fix
            raise APIError(f"cannot tokenize the prompt: {e}", param) from None

    def check_ids(self, ids: list[int], param: str = "prompt", empty_ok: bool = False
                  ) -> list[int]:
        if not ids and not empty_ok:
            raise APIError("the prompt is empty", param)
        for t in ids:
            if not 0 <= t < self.vocab_size:
                raise APIError(f"token id {t} is outside the vocabulary [0, {self.vocab_size})",
                               param)
        return list(ids)

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise APIError("this model has no chat template; use /v1/completions", "messages")
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=True)
        except Exception as e:  # the template's own raise_exception, bad roles, bad content
            raise APIError(f"cannot apply the chat template: {e}", "messages") from None
        # The template already holds BOS and the role markers.
        ids = self.tokenizer.encode(text, add_special_tokens=False, verbose=False)
        return self.check_ids(list(ids), "messages")

    def check_stop(self, stop: list[str], param: str = "stop") -> None:
        limit = self.limits.max_stop_sequences
        if len(stop) > limit:
            raise APIError(f"at most {limit} stop sequences are allowed, got {len(stop)}", param)

    def check_length(self, num_prompt: int, max_tokens: int | None, param: str = "prompt",
                     max_tokens_name: str = "max_tokens") -> int:
        """Returns max_tokens (filled in to the limit when None); refuses what cannot fit."""
        limit, max_input = self.limits.max_total_tokens, self.limits.max_input_tokens
        if num_prompt > max_input:
            raise APIError(f"the prompt has {num_prompt} tokens, but this model's maximum "
                           f"context length is {limit} tokens (prompt + output), of which at "
                           f"most {max_input} may be prompt", param, "context_length_exceeded")
        if max_tokens is None:
            return limit - num_prompt
        if num_prompt + max_tokens > limit:
            raise APIError(f"this model's maximum context length is {limit} tokens, but "
                           f"{num_prompt + max_tokens} were requested ({num_prompt} in the "
                           f"prompt, {max_tokens} for {max_tokens_name})", max_tokens_name,
                           "context_length_exceeded")
        return max_tokens

    # -- outputs --------------------------------------------------------------------------
    def token_text(self, token_id: int) -> str:
        """The text of one token on its own (for logprobs and TGI token details)."""
        text = self._texts.get(token_id)
        if text is None:
            text = self._texts[token_id] = self.tokenizer.decode([token_id])
        return text

    def is_special(self, token_id: int) -> bool:
        return token_id in self.special_ids
