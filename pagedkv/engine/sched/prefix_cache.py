"""The engine's side of automatic prefix caching: hash chains of branches, lookups, registration, hit counts.

A full block's identity is a hash of its tokens chained on its parent block's hash (``pagedkv.cache.block_hash``),
so one hash names a whole prefix. A new sequence (a request's prompt, or a preempted branch recomputing
``prompt + output``) starts on the longest run of cached blocks of its tokens and computes only the rest::

    prompt (block_size 4)   [t0 t1 t2 t3][t4 t5 t6 t7][t8 t9 t10 t11][t12 t13]
    hashes                   h0 ───────► h1 ───────► h2                (partial block: no hash)
    cached?                  yes          yes         no  ─► the chain stops: blocks of h0, h1 are taken
    computed this time                                [t8 ............... t13]   attends over t0..t7 too

At most ``(num_tokens - 1) // block_size`` blocks are taken, so at least one token is computed (its logits are
sampled). The block after the shared ones is usually only partly shared (a document's tail, then each request's
own tokens). A cached block with the same parent whose first ``k`` tokens equal the sequence's next ``k`` is
*copied* into the sequence's fresh block (one block copy, like copy-on-write) and computation starts ``k`` tokens
later; a cached block is never written, only read::

    cached child of h1      [t8 t9 x  y ]     (another request: the same t8 t9, then its own tokens)
    this sequence           [t8 t9 t10 t11] ─► fresh block = copy of it; compute from t10

The same copy serves a prompt that is entirely cached (a multiple of the block size): its last block is copied
and only its last token is computed, into the copy. A block is named (registered) once all its tokens' K/V is
written — prompt blocks after their prefill, generated blocks as decoding fills them. When its last reference
goes, a named block stays cached (evictable) until the pool hands it out again, least recently released first;
that drops its name, so no lookup ever finds memory holding other tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ...cache.block_hash import BlockHasher
from ..request import Branch, Request

MAX_COPY_CANDIDATES = 32  # cached siblings compared for a partial match (most recently named first)


@dataclass(slots=True)
class PrefixHit:
    """Where a new sequence starts: ``block_ids`` (cached, acquired with the sequence), then the first
    ``copy_tokens`` tokens of cached block ``copy_from`` copied into its next (fresh) block."""

    block_ids: list[int] = field(default_factory=list)
    copy_from: int | None = None
    copy_tokens: int = 0

    def num_tokens(self, block_size: int) -> int:
        return len(self.block_ids) * block_size + self.copy_tokens


@dataclass(slots=True)
class PrefixStats:
    """Lookups so far: tokens (and full blocks) of new sequences that asked, and how many the cache held."""

    num_query_tokens: int = 0
    num_hit_tokens: int = 0
    num_query_blocks: int = 0
    num_hit_blocks: int = 0


class PrefixCache:
    """Args:
        manager: a ``PagedAttentionManager`` built with ``enable_prefix_caching=True``.
        hasher: names blocks of this engine's model, dtype and block size.
    """

    def __init__(self, manager, hasher: BlockHasher):
        self.manager, self.hasher = manager, hasher
        self.block_size = manager.block_size
        self.stats = PrefixStats()
        # parent hash -> {hash of a named child block: its tokens}; stale entries (evicted) are dropped lazily
        self._children: dict[bytes, dict[bytes, tuple]] = {}
        self._num_children = 0

    def _hashes(self, request: Request, branch: Branch, num_blocks: int) -> list[bytes]:
        """The branch's first ``num_blocks`` block hashes (computed once from its tokens, then kept)."""
        h, bs = branch.block_hashes, self.block_size
        if len(h) < num_blocks:
            tokens = request.token_slice(branch, len(h) * bs, num_blocks * bs)
            h.extend(self.hasher.hash_full_blocks(tokens, bs, parent=h[-1] if h else None))
        return h[:num_blocks]

    def lookup(self, request: Request, branch: Branch) -> PrefixHit:
        """Where a new sequence for ``branch`` can start (nothing for prompt_logprobs requests, whose every
        prompt position needs logits); no state changes."""
        if request.params.prompt_logprobs is not None:
            return PrefixHit()
        bs, num_tokens = self.block_size, request.num_tokens(branch)
        hashes = self._hashes(request, branch, (num_tokens - 1) // bs)
        hit = PrefixHit(self.manager.lookup(hashes, num_tokens))
        i = len(hit.block_ids)
        rest = request.token_slice(branch, i * bs, min((i + 1) * bs, num_tokens - 1))
        if rest:
            hit.copy_from, hit.copy_tokens = self._best_sibling(hashes[i - 1] if i else self.hasher.root, rest)
        return hit

    def _best_sibling(self, parent: bytes, tokens: list[int]) -> tuple[int | None, int]:
        """The live named child of ``parent`` sharing the longest start with ``tokens``: (block id, length)."""
        children = self._children.get(parent)
        best, best_len, seen = None, 0, 0
        for h, child_tokens in reversed(list(children.items()) if children else []):
            found = self.manager.cached_block(h)
            if found is None:  # evicted since it was named
                del children[h]
                self._num_children -= 1
                continue
            k = _common_start(child_tokens, tokens)
            if k > best_len:
                best, best_len = found, k
            seen += 1
            if best_len == len(tokens) or seen == MAX_COPY_CANDIDATES:
                break
        return best, best_len

    def started(self, request: Request, branch: Branch, hit: PrefixHit) -> None:
        """``branch``'s sequence was created from ``hit``: count the lookup, remember the hit."""
        s, num_tokens, cached = self.stats, request.num_tokens(branch), hit.num_tokens(self.block_size)
        if request.params.prompt_logprobs is None:
            s.num_query_tokens += num_tokens
            s.num_query_blocks += num_tokens // self.block_size
            s.num_hit_tokens += cached
            s.num_hit_blocks += len(hit.block_ids)
        branch.num_registered = len(hit.block_ids)
        if not request.started and branch is request.branches[0]:
            request.num_cached_tokens = cached

    def register(self, request: Request, branch: Branch, full: int | None = None) -> None:
        """Name the branch's first ``full`` blocks (default: every block whose tokens are all computed)."""
        full = branch.num_computed // self.block_size if full is None else full
        if full <= branch.num_registered:
            return
        hashes, bs = self._hashes(request, branch, full), self.block_size
        for i in range(branch.num_registered, full):
            # False: the same content is cached in another block already
            if self.manager.register_block(branch.seq_id, i, hashes[i]):
                parent = hashes[i - 1] if i else self.hasher.root
                self._children.setdefault(parent, {})[hashes[i]] = tuple(request.token_slice(branch, i * bs,
                                                                                             (i + 1) * bs))
                self._num_children += 1
        branch.num_registered = full
        if self._num_children > 4 * self.manager.num_blocks:
            self._prune()

    def _prune(self) -> None:
        """Drop index entries of blocks evicted since they were named."""
        for parent in list(self._children):
            children = self._children[parent]
            for h in [h for h in children if self.manager.cached_block(h) is None]:
                del children[h]
            if not children:
                del self._children[parent]
        self._num_children = sum(len(c) for c in self._children.values())

    @staticmethod
    def pending_hashes(running) -> set[bytes]:
        """Hashes of prompt blocks that running requests are computing now (named once their prefill ends)."""
        out: set[bytes] = set()
        for r in running:
            if r.branches and not r.started:
                first = r.branches[0]
                out.update(first.block_hashes[first.num_registered:])
        return out

    @staticmethod
    def waits_for(branch: Branch, num_hits: int, pending: set[bytes]) -> bool:
        """True when the first block the branch would compute is being computed by a running request: it is
        better admitted a step later, when that block is cached, than computed twice.

        NOTE: requests that arrive together with a shared document would otherwise all prefill it in the
        step the first one does (nothing is cached yet).
        """
        return num_hits < len(branch.block_hashes) and branch.block_hashes[num_hits] in pending

    @staticmethod
    def fork(parent: Branch, child: Branch) -> None:
        """A forked child shares the parent's blocks, names and hashes."""
        child.block_hashes = list(parent.block_hashes)
        child.num_registered = parent.num_registered


def _common_start(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
