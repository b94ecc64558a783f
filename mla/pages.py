"""`PagedSequences`: the host bookkeeping every paged cache shares.

A pool of `num_pages` pages of `page_size` tokens, handed to sequences through a free list; each
sequence owns an ordered list of pages (token t of a sequence sits at row t % page_size of its
page t // page_size) and a length. Reservations are all or nothing; truncation returns the pages
a sequence no longer uses. The caches (`mla.LatentCache`, `mla.v4_cache.V4Cache`) add their
tensors and their own per-sequence state through the hooks `_added`, `_taken`, `_released`,
`_dropped`. A cache that needs only a sequence's recent tokens (`mla.v4_cache.V4Cache` with
`max_rollback`) gives back its oldest pages early with `_release_front`: their table entries
become RELEASED, the sequence keeps its length, and `first_held` says where its held tokens start.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence

import torch


RELEASED = -1
"""A sequence's page-list entry for a page it gave back early (`PagedSequences._release_front`)."""


class CacheFullError(RuntimeError):
    """Not enough free pages for a reservation. The cache is left exactly as it was."""


def as_int(name: str, value) -> int:
    """value as an int (any integer type, not bool); TypeError naming it otherwise."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {value!r}") from None


def positive(name: str, value) -> int:
    value = as_int(name, value)
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return value


class PagedSequences:
    """Sequences, their lengths and pages, and the free list of one page pool (host side).

    Args:
        num_pages: pages in the pool.
        page_size: tokens per page.
    """

    def __init__(self, num_pages: int, page_size: int):
        self.num_pages = positive("num_pages", num_pages)
        self.page_size = positive("page_size", page_size)
        # A stack: pop() hands out page 0 first and reuses the most recently freed page.
        self._free: list[int] = list(range(self.num_pages - 1, -1, -1))
        self._seq_pages: dict[int, list[int]] = {}
        self._lengths: dict[int, int] = {}
        self._front: dict[int, int] = {}  # leading pages each sequence gave back early
        self._next_id = 0

    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    def add_sequence(self) -> int:
        """Start an empty sequence; returns its id (ids are never reused)."""
        sid = self._next_id
        self._next_id += 1
        self._seq_pages[sid] = []
        self._lengths[sid] = 0
        self._front[sid] = 0
        self._added(sid)
        return sid

    def length(self, sid: int) -> int:
        """Tokens reserved for sequence `sid` (written or about to be)."""
        return self._lengths[self._check_id(sid)]

    def first_held(self, sid: int) -> int:
        """The first token of sequence `sid` whose page it still holds (0 unless it gave pages back
        early with `_release_front`; a multiple of page_size)."""
        return self._front[self._check_id(sid)] * self.page_size

    def reserve(self, seq_ids: Iterable[int], n: int | Sequence[int]) -> None:
        """Grow each sequence by n tokens (one int for all, or one per sequence: a sequence or
        1-D tensor), taking pages as needed.

        All or nothing: raises CacheFullError, with every sequence unchanged, if the pool
        cannot cover the whole request.
        """
        ids = self._check_ids(seq_ids, distinct=True)
        counts = self._counts(n, ids, "n")
        new_pages = [self._pages_for(self._lengths[s] + c) - len(self._seq_pages[s]) for s, c in zip(ids, counts)]
        if sum(new_pages) > len(self._free):
            raise CacheFullError(
                f"reserving {counts} tokens for sequences {ids} needs {sum(new_pages)} new pages, "
                f"only {len(self._free)} of {self.num_pages} are free; free or truncate sequences first"
            )
        for sid, count, k in zip(ids, counts, new_pages):
            pages = self._seq_pages[sid]
            if k:
                taken = [self._free.pop() for _ in range(k)]
                self._taken(sid, len(pages), taken)
                pages.extend(taken)
            self._lengths[sid] += count

    def truncate(self, sid: int, new_length: int) -> None:
        """Shorten sequence `sid` to `new_length` tokens; pages no longer used go back to the pool."""
        self._check_id(sid)
        new_length = as_int("new_length", new_length)
        if not 0 <= new_length <= self._lengths[sid]:
            raise ValueError(f"cannot truncate sequence {sid} of length {self._lengths[sid]} to {new_length}")
        pages = self._seq_pages[sid]
        keep = self._pages_for(new_length)
        if keep < len(pages):
            self._free.extend(reversed([p for p in pages[keep:] if p != RELEASED]))
            self._released(sid, keep, len(pages))
            del pages[keep:]
            self._front[sid] = min(self._front[sid], keep)
        self._lengths[sid] = new_length

    def free(self, sid: int) -> None:
        """Drop sequence `sid` and return all its pages to the pool."""
        self.truncate(sid, 0)
        del self._seq_pages[sid], self._lengths[sid], self._front[sid]
        self._dropped(sid)

    def _release_front(self, sid: int, before: int) -> int:
        """Give back the pages of sequence `sid` whose tokens all lie before token `before` (its
        length and later pages unchanged; those table entries become RELEASED). Returns how many
        pages went back to the pool. The caller decides which tokens are no longer needed; no hook
        runs (a cache that mirrors the tables on the device must update them itself)."""
        pages = self._seq_pages[sid]
        front, stop = self._front[sid], min(max(0, before) // self.page_size, len(pages))
        if stop <= front:
            return 0
        self._free.extend(reversed(pages[front:stop]))
        pages[front:stop] = [RELEASED] * (stop - front)
        self._front[sid] = stop
        return stop - front

    def _releasable(self, sid: int, before: int) -> int:
        """Pages `_release_front(sid, before)` would give back (changes nothing)."""
        return max(0, min(max(0, before) // self.page_size, len(self._seq_pages[sid])) - self._front[sid])

    # Hooks for the caches' own per-sequence state (defaults: none).
    def _added(self, sid: int) -> None:
        """Sequence `sid` was just created."""

    def _taken(self, sid: int, first: int, pages: list[int]) -> None:
        """Sequence `sid` takes `pages` as its pages first, first + 1, ..."""

    def _released(self, sid: int, keep: int, count: int) -> None:
        """Sequence `sid` gives back its pages keep ... count - 1 (truncate and free)."""

    def _dropped(self, sid: int) -> None:
        """Sequence `sid` was freed (after its pages were released)."""

    @staticmethod
    def _counts(n, ids: list[int], name: str) -> list[int]:
        """One int for every sequence, or one per sequence (a sequence or 1-D tensor) -> ints >= 0."""
        if isinstance(n, torch.Tensor) and n.dim() == 1:
            n = n.tolist()
        if isinstance(n, Sequence):
            if len(n) != len(ids):
                raise ValueError(f"{name} has {len(n)} counts for {len(ids)} sequences")
            counts = [as_int(name, c) for c in n]
        else:
            counts = [as_int(name, n)] * len(ids)
        for sid, count in zip(ids, counts):
            if count < 0:
                raise ValueError(f"{name} must be >= 0, got {count} for sequence {sid}")
        return counts

    def _pages_for(self, length: int) -> int:
        return -(-length // self.page_size)

    def _check_id(self, sid) -> int:
        sid = as_int("sequence id", sid)
        if sid not in self._lengths:
            if 0 <= sid < self._next_id:
                raise ValueError(f"sequence {sid} was already freed")
            raise ValueError(f"unknown sequence id {sid}")
        return sid

    def _check_ids(self, seq_ids: Iterable[int], distinct: bool = False) -> list[int]:
        if isinstance(seq_ids, torch.Tensor):
            seq_ids = seq_ids.tolist()
        if not isinstance(seq_ids, Iterable) or isinstance(seq_ids, (str, bytes)):
            raise TypeError(f"seq_ids must be a sequence of ints, got {seq_ids!r}")
        ids = [self._check_id(s) for s in seq_ids]
        if distinct and len(set(ids)) != len(ids):
            raise ValueError(f"seq_ids {ids} lists a sequence more than once")
        return ids
