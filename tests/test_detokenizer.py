"""IncrementalDetokenizer: deltas rebuild the full decode; stop strings are never half-emitted."""

from __future__ import annotations

import json
import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from engine.detokenizer import IncrementalDetokenizer
from engine.sampling_params import SamplingParams

LINES = [
    "The café on the corner serves crème brûlée and a very good espresso.",
    "Über den Wolken muss die Freiheit wohl grenzenlos sein, sagt der Müller.",
    "日本語のテキストも少し入れておきます。東京は大きな都市です。",
    "Emoji time: 🎉🚀 party rocket, 👍 thumbs up, and 🇯🇵 a flag.",
    "Stop here. STOP! The end is near; the END is here.\n\nNew paragraph.",
    "Numbers 12345 and symbols #@$%^&*() are fine too.",
]
SENTENCE = LINES[4]


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A small byte-level BPE trained here, so tokens split multi-byte characters."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420, special_tokens=["<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(LINES * 3, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>")


def make_sentencepiece_style_tokenizer() -> PreTrainedTokenizerFast:
    """Llama-2 / Mistral style: Metaspace words, `<0xNN>` byte fallback, leading space strip."""
    words = Tokenizer(models.BPE(unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, show_progress=False)
    words.train_from_iterator([line for line in LINES if line.isascii()] * 3, trainer)
    learnt = json.loads(words.to_str())["model"]
    vocab = dict(learnt["vocab"])
    vocab.update({f"<0x{b:02X}>": len(vocab) + b for b in range(256)})  # plain, not special
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learnt["merges"]]
    sp = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    sp.pre_tokenizer = words.pre_tokenizer
    sp.decoder = decoders.Sequence([
        decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
        decoders.Strip(" ", 1, 0),
    ])
    sp.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(
        tokenizer_object=sp, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


SPECIALS = ["<unk>", "<s>", "</s>"]


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture(scope="module")
def sp_tok() -> PreTrainedTokenizerFast:
    return make_sentencepiece_style_tokenizer()


def detok(tok: PreTrainedTokenizerFast, **kw) -> IncrementalDetokenizer:
    return IncrementalDetokenizer(tok, tok.encode("prompt"), SamplingParams(**kw))


def stream(d: IncrementalDetokenizer, ids: list[int], chunks: list[int] | None = None) -> list[str]:
    """Push `ids` one token at a time (or in the given chunk sizes); return every delta."""
    chunks = chunks or [1] * len(ids)
    out, i = [], 0
    for n in chunks:
        out.append(d.push(ids[i : i + n]))
        i += n
    assert i == len(ids)
    return out


def test_fixture_splits_multibyte_characters(tok: PreTrainedTokenizerFast) -> None:
    ids = tok.encode(LINES[2])
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # the hard case is really exercised
    assert tok.decode(ids) == LINES[2]


@pytest.mark.parametrize("line", LINES)
def test_deltas_of_real_text_are_prefixes_of_the_full_decode(
    tok: PreTrainedTokenizerFast, line: str
) -> None:
    ids = tok.encode(line)
    d = detok(tok)
    emitted = ""
    for delta in stream(d, ids):
        emitted += delta
        assert "\ufffd" not in emitted and line.startswith(emitted)
    assert d.flush() == ""
    assert emitted == d.text == line


@pytest.mark.parametrize("skip", [True, False])
def test_random_token_sequences_concatenate_to_the_full_decode(
    tok: PreTrainedTokenizerFast, skip: bool
) -> None:
    rng = random.Random(0)
    vocab = len(tok)
    for _ in range(300):
        ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, 40))]
        chunks = []
        while sum(chunks) < len(ids):
            chunks.append(min(rng.randint(1, 4), len(ids) - sum(chunks)))
        d = IncrementalDetokenizer(tok, [5, 6], SamplingParams(), skip_special_tokens=skip)
        text = "".join(stream(d, ids, chunks)) + d.flush()
        assert text == d.text == tok.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("skip", [True, False])
def test_sentencepiece_style_byte_fallback_and_leading_space(
    sp_tok: PreTrainedTokenizerFast, skip: bool
) -> None:
    for line in LINES:  # non-ASCII characters come out as <0xNN> byte tokens
        ids = sp_tok.encode(line, add_special_tokens=False)
        pieces = sp_tok.convert_ids_to_tokens(ids)
        assert line.isascii() or any(p.startswith("<0x") for p in pieces)
        d = IncrementalDetokenizer(sp_tok, [], SamplingParams(), skip_special_tokens=skip)
        emitted = "".join(stream(d, ids))
        assert line.startswith(emitted) and emitted + d.flush() == line
    rng = random.Random(2)
    for _ in range(500):
        # A byte run with one invalid byte decodes to all U+FFFD, and a leading space is
        # stripped only at the very start: both must come out as in the full decode.
        ids = [rng.randrange(len(sp_tok)) for _ in range(rng.randrange(1, 30))]
        d = IncrementalDetokenizer(sp_tok, [], SamplingParams(), skip_special_tokens=skip)
        text = "".join(stream(d, ids)) + d.flush()
        assert text == sp_tok.decode(ids, skip_special_tokens=skip)


def test_random_multibyte_text_with_special_tokens(tok: PreTrainedTokenizerFast) -> None:
    rng = random.Random(1)
    words = "".join(LINES).split(" ")
    for _ in range(100):
        ids = tok.encode(" ".join(rng.choices(words, k=12)))
        for _ in range(3):
            ids.insert(rng.randrange(len(ids) + 1), tok.eos_token_id)
        d = detok(tok)
        text = "".join(stream(d, ids))
        assert "\ufffd" not in text
        assert text + d.flush() == tok.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("reps", [1, 10, 40])
def test_decode_work_is_linear_in_output_length(tok: PreTrainedTokenizerFast, reps: int) -> None:
    ids = tok.encode(" ".join(LINES)) * reps  # 177 tokens per repetition
    d = detok(tok)
    sizes: list[int] = []
    real = d._decode
    d._decode = lambda w: (sizes.append(len(w)), real(w))[1]  # type: ignore[method-assign]
    assert "".join(stream(d, ids)) == tok.decode(ids)
    # The window spans the tokens since the last character boundary plus the step before; in
    # this small BPE the Japanese line has runs of tokens that all end mid-character.
    assert max(sizes) <= 14 and sum(sizes) <= 5 * len(ids)


def test_stop_string_spanning_tokens_is_held_and_never_half_emitted(
    tok: PreTrainedTokenizerFast,
) -> None:
    ids = tok.encode(SENTENCE)
    stop = "the END"
    cut = SENTENCE.index(stop)
    assert all(stop not in tok.decode([i]) for i in ids)  # it spans several tokens
    d = detok(tok, stop=[stop])
    emitted, held_seen = "", False
    for i in range(len(ids)):
        emitted += d.push(ids[i : i + 1])
        assert SENTENCE[:cut].startswith(emitted)  # never a character past the cut
        decoded = tok.decode(ids[: i + 1])
        if cut < len(decoded) < cut + len(stop):  # a partial "the END" is decoded, unresolved
            assert emitted == SENTENCE[:cut] and not d.finished_by_stop
            held_seen = True
    assert held_seen
    assert d.finished_by_stop and emitted == d.text == SENTENCE[:cut]
    assert d.push(tok.encode(" more")) == "" and d.flush() == ""


def test_include_stop_str_in_output(tok: PreTrainedTokenizerFast) -> None:
    ids = tok.encode(SENTENCE)
    d = detok(tok, stop=["the END"], include_stop_str_in_output=True)
    text = "".join(stream(d, ids))
    assert text == SENTENCE[: SENTENCE.index("the END") + len("the END")]
    assert d.finished_by_stop and d.flush() == ""


def test_flush_releases_an_unresolved_stop_prefix(tok: PreTrainedTokenizerFast) -> None:
    text = "Stop here. STOP! The end is near; the EN"
    ids = tok.encode(text)
    d = detok(tok, stop=["the END"])
    assert "".join(stream(d, ids)) == "Stop here. STOP! The end is near; "
    assert d.flush() == "the EN"
    assert not d.finished_by_stop and d.text == text


def test_stop_prefix_that_does_not_complete_is_released_later(
    tok: PreTrainedTokenizerFast,
) -> None:
    ids = tok.encode(SENTENCE)
    d = detok(tok, stop=["the ENDING"])
    assert "".join(stream(d, ids)) + d.flush() == SENTENCE
    assert not d.finished_by_stop


def test_multibyte_stop_string(tok: PreTrainedTokenizerFast) -> None:
    line = LINES[2]
    d = detok(tok, stop=["東京"])
    assert "".join(stream(d, tok.encode(line))) == line[: line.index("東京")]
    assert d.finished_by_stop


def test_earliest_ending_stop_wins_whatever_the_chunking(tok: PreTrainedTokenizerFast) -> None:
    ids = tok.encode(SENTENCE)
    want = "Stop here. STOP! The end "  # "is" ends before "The end is near" does
    for chunks in ([1] * len(ids), [len(ids)], [3] * (len(ids) // 3) + [len(ids) % 3]):
        d = detok(tok, stop=["The end is near", "is"])
        assert "".join(stream(d, ids, [c for c in chunks if c])) == want


def test_stop_inside_one_token_and_repeated_stop_characters(
    tok: PreTrainedTokenizerFast,
) -> None:
    d = detok(tok, stop=["TO"])
    assert "".join(stream(d, tok.encode(SENTENCE))) == "Stop here. S"
    d = detok(tok, stop=["\n\nNew"])
    assert "".join(stream(d, tok.encode(SENTENCE))) == SENTENCE[: SENTENCE.index("\n\n")]


def test_random_stop_strings_match_a_character_level_reference(
    tok: PreTrainedTokenizerFast,
) -> None:
    rng = random.Random(3)
    text = " ".join(LINES)
    ids = tok.encode(text)
    for _ in range(200):
        stops = []
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(text) - 8)
            s = text[i : i + rng.randint(1, 8)]
            stops.append(s + "\u00a7" if rng.random() < 0.3 else s)  # some never complete
        include = rng.random() < 0.5
        ends = [(text.find(s) + len(s), text.find(s)) for s in stops if s in text]
        if ends:
            end, start = min(ends)
            want = text[: end if include else start]
        else:
            want = text
        chunks = []
        while sum(chunks) < len(ids):
            chunks.append(min(rng.randint(1, 5), len(ids) - sum(chunks)))
        d = detok(tok, stop=stops, include_stop_str_in_output=include)
        emitted = ""
        for delta in stream(d, ids, chunks):
            emitted += delta
            assert want.startswith(emitted), (stops, emitted)
        assert emitted + d.flush() == want == d.text, stops
        assert d.finished_by_stop == bool(ends)
