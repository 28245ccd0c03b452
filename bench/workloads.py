"""Benchmark workloads: lists of requests (prompt + output length), deterministic per seed.

Prompts are random token ids (what the serving path sees, no tokenizer in the way) or text made
of common words, about one token per word. Each generator takes a `random.Random`, so the same
seed always yields the same requests.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

WORKLOADS = ("synthetic", "shared-prefix", "long-prompt")
PROMPT_FORMATS = ("ids", "text")

_WORDS = (
    "the of and to in is for on that with as it at by from this be are was or an have not but "
    "all they one can more has time about which when will there their what some out up other "
    "into new used would may these first two only any most like over such years make people"
).split()


@dataclass(frozen=True)
class LengthDist:
    """A length distribution parsed from 'N', 'fixed:N', 'uniform:LO:HI' (inclusive) or
    'normal:MEAN:STD[:MIN[:MAX]]' (rounded and clipped; MIN defaults to 1)."""

    kind: str
    a: float
    b: float = 0.0
    lo: int = 1
    hi: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("fixed", "uniform", "normal"):
            raise ValueError(f"unknown length distribution {self.kind!r}")
        if self.kind == "uniform" and not 1 <= self.a <= self.b:
            raise ValueError("uniform:LO:HI needs 1 <= LO <= HI")
        if self.kind == "fixed" and self.a < 1:
            raise ValueError("fixed length must be >= 1")
        if self.lo < 1 or (self.hi is not None and self.hi < self.lo):
            raise ValueError("normal clip bounds need 1 <= MIN <= MAX")

    @classmethod
    def parse(cls, text: str) -> LengthDist:
        parts = text.strip().split(":")
        try:
            if len(parts) == 1:
                return cls("fixed", int(parts[0]))
            kind, nums = parts[0], [float(x) for x in parts[1:]]
            if kind == "fixed" and len(nums) == 1:
                return cls("fixed", int(nums[0]))
            if kind == "uniform" and len(nums) == 2:
                return cls("uniform", int(nums[0]), int(nums[1]))
            if kind == "normal" and 2 <= len(nums) <= 4:
                lo = int(nums[2]) if len(nums) > 2 else 1
                hi = int(nums[3]) if len(nums) > 3 else None
                return cls("normal", nums[0], nums[1], lo, hi)
        except ValueError as e:
            raise ValueError(f"bad length distribution {text!r}: {e}") from None
        raise ValueError(
            f"bad length distribution {text!r}; use N, fixed:N, uniform:LO:HI "
            "or normal:MEAN:STD[:MIN[:MAX]]"
        )

    def sample(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            return int(self.a)
        if self.kind == "uniform":
            return rng.randint(int(self.a), int(self.b))
        n = max(self.lo, round(rng.gauss(self.a, self.b)))
        return n if self.hi is None else min(n, self.hi)


@dataclass(frozen=True)
class RequestSpec:
    prompt: list[int] | str
    prompt_len: int  # tokens for ids; words for text (about one token each)
    output_len: int
    group: int = -1  # shared-prefix group, -1 when none


@dataclass(frozen=True)
class PromptMaker:
    fmt: str = "ids"
    vocab_size: int = 1000

    def __post_init__(self) -> None:
        if self.fmt not in PROMPT_FORMATS:
            raise ValueError(f"prompt format must be one of {PROMPT_FORMATS}")
        if self.vocab_size < 2:
            raise ValueError("vocab_size must be >= 2")

    def make(self, n: int, rng: random.Random) -> list[int] | str:
        if self.fmt == "ids":
            return [rng.randrange(self.vocab_size) for _ in range(n)]
        return " ".join(rng.choice(_WORDS) for _ in range(n))

    def join(self, a: list[int] | str, b: list[int] | str) -> list[int] | str:
        if isinstance(a, str) and isinstance(b, str):
            return f"{a} {b}"
        assert isinstance(a, list) and isinstance(b, list)
        return a + b


def synthetic(
    n: int, input_len: LengthDist, output_len: LengthDist, maker: PromptMaker, rng: random.Random
) -> list[RequestSpec]:
    specs = []
    for _ in range(n):
        plen, olen = input_len.sample(rng), output_len.sample(rng)
        specs.append(RequestSpec(maker.make(plen, rng), plen, olen))
    return specs


def shared_prefix(
    num_groups: int,
    group_size: int,
    prefix_len: int,
    suffix_len: int,
    output_len: LengthDist,
    maker: PromptMaker,
    rng: random.Random,
) -> list[RequestSpec]:
    """num_groups x group_size requests; a group shares a prefix_len-token prefix, each request
    adds its own suffix_len tokens. Requests go round-robin over groups, so a group's requests
    are spread over the run and a prefix must survive in the cache between them."""
    if num_groups < 1 or group_size < 1 or prefix_len < 0 or suffix_len < 0:
        raise ValueError("shared-prefix needs groups, group size >= 1 and lengths >= 0")
    if prefix_len + suffix_len < 1:
        raise ValueError("shared-prefix prompts need at least one token")
    prefixes = [maker.make(prefix_len, rng) for _ in range(num_groups)]
    specs = []
    for _ in range(group_size):
        for g, prefix in enumerate(prefixes):
            prompt = maker.join(prefix, maker.make(suffix_len, rng)) if suffix_len else prefix
            specs.append(RequestSpec(prompt, prefix_len + suffix_len, output_len.sample(rng), g))
    return specs


# Long inputs with short outputs: prefill-heavy, where prefill interference on decode shows.
LONG_PROMPT_INPUT = "fixed:2048"
LONG_PROMPT_OUTPUT = "fixed:16"
SYNTHETIC_INPUT = "fixed:128"
SYNTHETIC_OUTPUT = "fixed:128"


@dataclass(frozen=True)
class WorkloadConfig:
    name: str = "synthetic"
    num_prompts: int = 100
    input_len: str | None = None  # None: the workload's default
    output_len: str | None = None
    num_groups: int = 4
    group_size: int = 8
    prefix_len: int = 512
    suffix_len: int = 32
    prompt_format: str = "ids"
    vocab_size: int = 1000

    def __post_init__(self) -> None:
        if self.name not in WORKLOADS:
            raise ValueError(f"workload must be one of {WORKLOADS}, got {self.name!r}")
        if self.num_prompts < 1:
            raise ValueError("num_prompts must be >= 1")
        PromptMaker(self.prompt_format, self.vocab_size)  # validates
        _ = (self.input_dist, self.output_dist)  # parse now: fail at startup, not mid-run

    @property
    def input_dist(self) -> LengthDist:
        default = LONG_PROMPT_INPUT if self.name == "long-prompt" else SYNTHETIC_INPUT
        return LengthDist.parse(self.input_len or default)

    @property
    def output_dist(self) -> LengthDist:
        default = LONG_PROMPT_OUTPUT if self.name == "long-prompt" else SYNTHETIC_OUTPUT
        return LengthDist.parse(self.output_len or default)


def build_workload(cfg: WorkloadConfig, seed: int | str) -> list[RequestSpec]:
    """The requests of one run. `seed` may be a string such as 'SEED:RATE:REPEAT', so every run
    gets fresh prompts (a server's prefix cache must not carry over between runs) while the
    same run on two systems gets the same ones."""
    rng = random.Random(seed)
    maker = PromptMaker(cfg.prompt_format, cfg.vocab_size)
    if cfg.name == "shared-prefix":
        return shared_prefix(
            cfg.num_groups, cfg.group_size, cfg.prefix_len, cfg.suffix_len, cfg.output_dist,
            maker, rng,
        )
    return synthetic(cfg.num_prompts, cfg.input_dist, cfg.output_dist, maker, rng)
