"""Chain hashes of full KV blocks: hash(block i) = H(hash(block i-1), tokens of block i).

Stable across processes and machines (blake2b, not Python's hash), so a decode replica can look
up the prefix blocks that a prefill replica computed.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterator

ROOT = 0


def hash_block(parent: int, tokens: list[int] | tuple[int, ...]) -> int:
    data = struct.pack(f"<Q{len(tokens)}I", parent, *tokens)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def iter_block_hashes(token_ids: list[int], page_size: int, start: list[int] | None = None,
                      ) -> Iterator[int]:
    """The chain hashes of the full blocks of `token_ids` after the `start` ones (hashes already
    known), computed one block at a time as they are asked for."""
    parent = start[-1] if start else ROOT
    for i in range(len(start or ()), len(token_ids) // page_size):
        parent = hash_block(parent, token_ids[i * page_size:(i + 1) * page_size])
        yield parent


def block_hashes(token_ids: list[int], page_size: int, start: list[int] | None = None,
                 ) -> list[int]:
    """Chain hashes of every full block of `token_ids`; `start` are hashes already known."""
    return [*(start or []), *iter_block_hashes(token_ids, page_size, start)]
