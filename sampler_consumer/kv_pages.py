"""The KV cache's page bookkeeping (no tensors): refcounted pages, a free list, and a prefix cache.

A page holds `page_size` consecutive positions of one sequence's keys and values in every layer. Full prompt
pages can be shared by several rows (an RL group, num_samples > 1, or a later request with the same prompt and
adapter version): each row holds a reference. A page whose full content is known is published under a digest of
(adapter version, every token up to the page's end); when its last reference goes it is kept as an idle cached
page, reusable by the next identical prefix, and evicted least recently used first when pages run out.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Hashable, Sequence

SCRATCH_PAGE = 0  # never handed out: padded rows of a fixed-size (graph) batch write their KV here


class OutOfPages(RuntimeError):
    pass


def page_digests(adapter_key: Hashable, tokens: Sequence[int], page_size: int, pages: int) -> list[bytes]:
    """Digests of the first `pages` full pages; each one covers every token before its end (a hash chain)."""
    digests, parent = [], hashlib.blake2b(repr(adapter_key).encode(), digest_size=16).digest()
    for i in range(pages):
        chunk = ",".join(map(str, tokens[i * page_size:(i + 1) * page_size])).encode()
        parent = hashlib.blake2b(parent + chunk, digest_size=16).digest()
        digests.append(parent)
    return digests


class PagePool:
    def __init__(self, num_pages: int, page_size: int) -> None:
        if num_pages < 2:
            raise ValueError("the KV cache needs at least 2 pages (one is the scratch page)")
        self.num_pages, self.page_size = num_pages, page_size
        self.refs = [0] * num_pages
        self._free = list(range(num_pages - 1, SCRATCH_PAGE, -1))  # pop() hands out low page ids first
        self._digest_of: dict[int, bytes] = {}
        self._page_of: dict[bytes, int] = {}
        self._idle: OrderedDict[int, None] = OrderedDict()  # cached pages nobody references, oldest first
        self.hits = 0  # prefix pages reused
        self.lookups = self.lookup_hits = 0  # prefix-cache lookups, and those that reused at least one page

    @property
    def available(self) -> int:
        """Pages that `allocate` can hand out (free + idle cached ones it may evict)."""
        return len(self._free) + len(self._idle)

    @property
    def free_pages(self) -> int:
        return len(self._free)

    @property
    def cached_pages(self) -> int:
        return len(self._digest_of)

    def allocate(self) -> int:
        if self._free:
            page = self._free.pop()
        elif self._idle:
            page, _ = self._idle.popitem(last=False)
            del self._page_of[self._digest_of.pop(page)]
        else:
            raise OutOfPages("no free KV page")
        self.refs[page] = 1
        return page

    def retain(self, page: int) -> None:
        if self.refs[page] == 0:
            self._idle.pop(page)
        self.refs[page] += 1

    def release(self, page: int) -> None:
        if self.refs[page] <= 0:
            raise AssertionError(f"page {page} released more often than retained")
        self.refs[page] -= 1
        if self.refs[page] == 0:
            if page in self._digest_of:
                self._idle[page] = None
            else:
                self._free.append(page)

    def release_all(self, pages: Sequence[int]) -> None:
        for page in pages:
            self.release(page)

    # ------------------------------------------------------------------ prefix cache
    def match(self, digests: Sequence[bytes]) -> list[int]:
        """The cached pages of the longest cached prefix of `digests`, each retained for the caller."""
        pages = []
        for digest in digests:
            page = self._page_of.get(digest)
            if page is None:
                break
            self.retain(page)
            pages.append(page)
        self.lookups += 1
        self.lookup_hits += bool(pages)
        self.hits += len(pages)
        return pages

    def publish(self, pages: Sequence[int], digests: Sequence[bytes]) -> None:
        """Make full pages findable by `match`. A digest already cached keeps its page (this one stays private)."""
        for page, digest in zip(pages, digests, strict=False):
            if digest not in self._page_of and page not in self._digest_of:
                self._page_of[digest] = page
                self._digest_of[page] = digest
