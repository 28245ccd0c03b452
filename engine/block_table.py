"""Block tables as int32 numpy rows: the per-step view and the runner's incremental mirror.

Building attention metadata from Python page lists costs one Python operation per page (128
requests x 2K pages = ~26 ms of host time per step while the GPU waits). The runner keeps the
running requests' block tables as rows of one int32 array instead, copying only the pages that
a step added, so that metadata is built by vectorized gathers over those rows.
Plain numpy: no torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np

from engine.request import Request


@dataclass(frozen=True)
class PageRows:
    """The block tables of one batch: request b's pages are `table[rows[b], :lens[b]]`.

    Entries of a row past its length are garbage (a freed row keeps its old owner's pages), so
    readers must stay within `lens`. The arrays are shared with the mirror that made them and
    are valid until its next `sync`; never hand them out without copying.
    """

    table: np.ndarray  # [R, W] int32, W >= 1
    rows: np.ndarray  # [B] int64, row of each request in batch order
    lens: np.ndarray  # [B] int64, pages in each request's block table

    def __len__(self) -> int:
        return len(self.rows)

    def take(self, order: Sequence[int]) -> PageRows:
        """The same tables in another batch order (e.g. a cascade plan's)."""
        idx = np.asarray(order, dtype=np.int64)
        return PageRows(self.table, self.rows[idx], self.lens[idx])

    @staticmethod
    def from_lists(tables: Sequence[Sequence[int]]) -> PageRows:
        """Pack plain page lists (tests, warm-up, graph capture) into rows."""
        lens = np.fromiter(map(len, tables), dtype=np.int64, count=len(tables))  # [B]
        table = np.zeros((len(tables), max(int(lens.max(initial=0)), 1)), dtype=np.int32)
        filled = np.arange(table.shape[1]) < lens[:, None]  # [B, W]: row-major = list order
        table[filled] = np.fromiter(chain.from_iterable(tables), dtype=np.int32,
                                    count=int(lens.sum()))
        return PageRows(table, np.arange(len(tables), dtype=np.int64), lens)


def as_page_rows(tables: PageRows | Sequence[Sequence[int]]) -> PageRows:
    return tables if isinstance(tables, PageRows) else PageRows.from_lists(tables)


class BlockTableMirror:
    """The runner's copy of the scheduled requests' `block_table` lists, one int32 row each.

    Contract:
    - `sync(requests)` is called once per step with that step's requests and returns their
      tables as `PageRows` in the same order.
    - A row remembers the list object it mirrors and how many pages it copied. While the
      request's `block_table` is that same object and not shorter, only the pages past that
      count are copied: the scheduler grows a table in place with `+=` and never rewrites a
      page in place. Any other list (preemption or release assigns a new one, so do prefix
      matching and the decode role's `reserve`) or a shorter one is copied from scratch.
    - A request absent from a step loses its row (it is copied from scratch if it comes back).
      The array so holds at most the largest step's requests, and a reused row is always
      rewritten from its new owner's list before it is read.
    """

    def __init__(self, num_rows: int = 8, width: int = 64) -> None:
        self.table = np.zeros((num_rows, width), dtype=np.int32)  # [R, W]
        self._row: dict[Request, int] = {}  # request -> its row, requests of the last step
        self._source: list[list[int] | None] = [None] * num_rows  # list object each row mirrors
        self._copied = [0] * num_rows  # pages of that list copied into the row
        self._free = list(range(num_rows - 1, -1, -1))  # a stack: low rows are reused first

    @property
    def num_rows_used(self) -> int:
        return len(self._row)

    def sync(self, requests: Sequence[Request]) -> PageRows:
        old = self._row
        kept = [old.pop(req, None) for req in requests]
        for row in old.values():  # requests not in this step: free first, for reuse below
            self._release_row(row)
        self._row = {}
        rows = np.empty(len(requests), dtype=np.int64)  # [B]
        lens = np.empty(len(requests), dtype=np.int64)  # [B]
        for b, (req, row) in enumerate(zip(requests, kept)):
            if row is None:
                row = self._take_row()
            self._row[req] = row
            rows[b] = row
            lens[b] = self._update(row, req.block_table)
        return PageRows(self.table, rows, lens)

    def _update(self, row: int, pages: list[int]) -> int:
        n, done = len(pages), self._copied[row]
        if self._source[row] is not pages or n < done:
            self._source[row], done = pages, 0
        if n > done:
            if n > self.table.shape[1]:
                self._grow(width=max(n, 2 * self.table.shape[1]))
            self.table[row, done:n] = pages[done:n]
        self._copied[row] = n
        return n

    def _take_row(self) -> int:
        if not self._free:
            self._grow(num_rows=2 * self.table.shape[0])
        return self._free.pop()

    def _release_row(self, row: int) -> None:
        self._source[row], self._copied[row] = None, 0  # drop the list; the next owner recopies
        self._free.append(row)

    def _grow(self, num_rows: int | None = None, width: int | None = None) -> None:
        r, w = self.table.shape
        num_rows, width = num_rows or r, width or w
        table = np.zeros((num_rows, width), dtype=np.int32)
        table[:r, :w] = self.table
        self.table = table
        self._source += [None] * (num_rows - r)
        self._copied += [0] * (num_rows - r)
        self._free += range(num_rows - 1, r - 1, -1)
