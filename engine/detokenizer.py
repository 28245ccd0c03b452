"""Incremental detokenization of one request's output, with stop strings.

Contract of `IncrementalDetokenizer`:

- `push(token_ids)` returns the text delta those tokens add. Deltas followed by `flush()`
  concatenate exactly to `tokenizer.decode(output_ids, skip_special_tokens=...)` when no stop
  string matched; a character whose bytes are split across tokens is never emitted partially.
- Stop strings (`params.stop`): the text ends just before the earliest-ending match (just after
  it with `params.include_stop_str_in_output`), `finished_by_stop` turns True, and later pushes
  return ''. A tail that could still grow into a stop string is held back until resolved, so a
  stop string is never emitted partially.
- `flush()` returns what is still held back (an unresolved stop-string prefix, or a trailing
  undecodable byte sequence); call it once when the request ends for another reason.
- `text` is everything emitted so far.

Only a short window of recent tokens is decoded per push, so the work is linear in the output
length. The window runs from `_prefix` to the end; `_anchor` is the text of
`ids[_prefix:_read]`, which has already been emitted. The new text is the window's decode minus
the anchor, a diff that keeps context-dependent pieces (byte-level BPE bytes, leading spaces
that some decoders strip at the start of a sequence) identical to a decode of the whole output.
Text is emitted only at a token where the decoder is back at a character boundary, which is
what keeps the diff exact; the window grows while tokens keep ending mid-character. With
sentencepiece byte fallback (`<0xNN>` tokens) HF decodes a run of byte tokens as one unit,
all U+FFFD if any byte is invalid, so such a run is held until a non-byte token ends it.
The prompt is not part of the window, so the output decodes as it would on its own.
"""

from __future__ import annotations

import re
import weakref

from transformers import PreTrainedTokenizerBase

from engine.sampling_params import SamplingParams

_REPLACEMENT = "\ufffd"  # what a decoder yields for bytes that are not (yet) a whole character
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_byte_ids_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def byte_fallback_ids(tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """Ids of `<0xNN>` byte tokens when the tokenizer's model falls back to bytes, else empty.

    Scanning a vocabulary costs tens of milliseconds, so the answer is kept per tokenizer.
    """
    try:
        return _byte_ids_cache[tokenizer]
    except (KeyError, TypeError):
        pass
    model = getattr(getattr(tokenizer, "backend_tokenizer", None), "model", None)
    ids: frozenset[int] = frozenset()
    if getattr(model, "byte_fallback", False):
        vocab = tokenizer.get_vocab()
        ids = frozenset(i for t, i in vocab.items() if _BYTE_TOKEN.fullmatch(t))
    try:
        _byte_ids_cache[tokenizer] = ids
    except TypeError:  # not weak-referenceable: recompute next time
        pass
    return ids


def _decoder(tokenizer: PreTrainedTokenizerBase, skip_special_tokens: bool):
    """`tokenizer.decode` for lists of ids. A fast tokenizer's Rust decoder directly when that
    is all `decode` would run (no clean-up of tokenization spaces): the Python wrapper around it
    converts and checks every id first, which cost more than the decode itself, twice per
    streamed token."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return lambda ids: backend.decode(ids, skip_special_tokens=skip_special_tokens)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


class IncrementalDetokenizer:
    """One request's streaming text; `prompt_token_ids` is only counted, never decoded."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompt_token_ids: list[int],
        params: SamplingParams,
        skip_special_tokens: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.num_prompt_tokens = len(prompt_token_ids)
        self.skip_special_tokens = skip_special_tokens
        self._decode_ids = _decoder(tokenizer, skip_special_tokens)
        self._byte_ids = byte_fallback_ids(tokenizer)
        # Tokens that vanish from the decode: what precedes them decides where the text ends.
        self._skipped = frozenset(tokenizer.all_special_ids if skip_special_tokens else ())
        self.stop = list(params.stop)
        self.include_stop = params.include_stop_str_in_output
        self.finished_by_stop = False
        self.output_ids: list[int] = []
        self._prefix = 0  # window start (token index)
        self._read = 0  # tokens before this index have had their text emitted
        self._anchor = ""  # decode of output_ids[_prefix:_read]
        self._held = ""  # decoded text held back as a possible stop-string prefix
        self._emitted: list[str] = []

    @property
    def text(self) -> str:
        return "".join(self._emitted)

    def push(self, token_ids: list[int]) -> str:
        if self.finished_by_stop:
            return ""
        self.output_ids.extend(token_ids)
        return self._emit(self._decode_new(final=False), final=False)

    def flush(self) -> str:
        if self.finished_by_stop:
            return ""
        return self._emit(self._decode_new(final=True), final=True)

    def _decode(self, ids: list[int]) -> str:
        return self._decode_ids(ids)

    def _decode_new(self, final: bool) -> str:
        """Text of the tokens after `_read`, or '' while it ends inside a character."""
        if self._read == len(self.output_ids):
            return ""
        window = self._decode(self.output_ids[self._prefix :])
        # A trailing U+FFFD may be a character whose remaining bytes are in the next token, and
        # a trailing byte-fallback run may still be rewritten by the next byte token; wait for
        # either to end. At the end of the request the text is final, so release it then.
        if not final and (window.endswith(_REPLACEMENT) or self._ends_in_byte_run()):
            return ""
        new = window[len(self._anchor) :]
        # The anchor must hold a visible token: decoders that strip a leading space at the start
        # of a sequence then strip it from the anchor, never from the new text.
        if any(t not in self._skipped for t in self.output_ids[self._read :]):
            self._prefix = self._read
        self._read = len(self.output_ids)
        self._anchor = self._decode(self.output_ids[self._prefix : self._read])
        return new

    def _ends_in_byte_run(self) -> bool:
        if not self._byte_ids:
            return False
        for t in reversed(self.output_ids):
            if t not in self._skipped:
                return t in self._byte_ids
        return False

    def _emit(self, new: str, final: bool) -> str:
        """Apply stop strings to held + new text; return the part that is safe to emit."""
        buf = self._held + new
        self._held = ""
        if not buf:
            return ""
        match = self._find_stop(buf)
        if match is not None:
            start, end = match
            self.finished_by_stop = True
            out = buf[: end if self.include_stop else start]
        else:
            hold = 0 if final else self._stop_prefix_len(buf)
            out, self._held = buf[: len(buf) - hold], buf[len(buf) - hold :]
        self._emitted.append(out)
        return out

    def _find_stop(self, buf: str) -> tuple[int, int] | None:
        """(start, end) of the match that ends first (ties: the longer one), or None.

        Ending first is what a character-by-character stream would see first, so the result
        does not depend on how the text was split into tokens. Earlier emitted text needs no
        search: `_held` always covers every suffix of it that a stop string could start in.
        """
        best: tuple[int, int] | None = None
        for s in self.stop:
            i = buf.find(s)
            if i >= 0 and (best is None or (i + len(s), i) < (best[1], best[0])):
                best = (i, i + len(s))
        return best

    def _stop_prefix_len(self, buf: str) -> int:
        """Length of the longest suffix of `buf` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            # Candidate starts: occurrences of s[0] among the last len(s) - 1 characters.
            i = buf.find(s[0], max(0, len(buf) - len(s) + 1))
            while i != -1 and len(buf) - i > best:
                if s.startswith(buf[i:]):
                    best = len(buf) - i
                    break
                i = buf.find(s[0], i + 1)
        return best
