"""The request constraints that depend on the config and the model, written into the schema.

The request models state what holds for any deployment; these bounds come from `limits` and
the tokenizer, so they are filled in when the app is built: the stop-sequence count, the output
room (`max_tokens` and friends), TGI's `truncate`, token ids inside the vocabulary, and how many
prompts and prompt tokens one request may carry.

One bound is exact only for the shortest prompt: a prompt's tokens plus its output must fit
`max_total_tokens`, and the token count of a text is not something JSON Schema can state. The
output maxima below are therefore `max_total_tokens` minus the fewest tokens a prompt can have
(one token id; one token after TGI's `truncate`; the chat template around one empty message):
a larger value is refused whatever the prompt, a smaller one can still be refused for a long
prompt, with a 400 `context_length_exceeded` (422 on TGI routes) that names both numbers.
"""

from __future__ import annotations

from typing import Any

from api.chat_messages import ROLES
from api.context import ServerContext
from api.errors import APIError


def limit_requests(comps: dict[str, Any], ctx: ServerContext) -> None:
    lim = ctx.limits
    total = lim.max_total_tokens
    assert total is not None and lim.max_input_tokens is not None  # resolved limits
    for name in ("CompletionRequest", "ChatCompletionRequest", "Parameters"):
        _bound(comps[name], "stop", "array", maxItems=lim.max_stop_sequences)
    _bound(comps["CompletionRequest"], "max_tokens", "integer", maximum=total - 1)
    _bound(comps["Parameters"], "max_new_tokens", "integer", maximum=total - 1)
    _bound(comps["Parameters"], "truncate", "integer", maximum=lim.max_input_tokens)
    room = total - _shortest_chat_prompt(ctx)
    for name in ("max_tokens", "max_completion_tokens"):
        _bound(comps["ChatCompletionRequest"], name, "integer", maximum=room)

    token_id = {"type": "integer", "minimum": 0, "maximum": ctx.vocab_size - 1}
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        _bound(comps[name], "stop_token_ids", "array", items=token_id)
    ids = {"type": "array", "items": token_id, "minItems": 1, "maxItems": lim.max_input_tokens}
    for alt in comps["CompletionRequest"]["properties"]["prompt"]["anyOf"]:
        if alt.get("type") != "array":
            continue
        items = alt["items"]
        if items.get("type") == "array":  # a batch of token-id prompts
            alt.update(maxItems=lim.max_client_batch_size, items=ids)
        elif items.get("type") == "string":  # a batch of texts
            alt["maxItems"] = lim.max_client_batch_size
        else:  # one prompt of token ids
            alt.update(ids)


def _bound(model: dict[str, Any], prop: str, kind: str, **constraints: Any) -> None:
    """Adds `constraints` to the `kind` alternative of property `prop` (or to the property
    itself when it has no alternatives)."""
    schema = model["properties"][prop]
    for alt in schema.get("anyOf", [schema]):
        if alt.get("type") == kind:
            alt.update(constraints)


def _shortest_chat_prompt(ctx: ServerContext) -> int:
    """The fewest tokens a chat request's prompt can have: one message with empty content, the
    shortest over the roles the template takes alone (1 when the model has no template)."""
    lengths = []
    for role in ROLES:
        try:
            lengths.append(len(ctx.chat_ids([{"role": role, "content": ""}])))
        except APIError:  # a template that refuses this role alone, or no template
            continue
    return min(lengths, default=1)
