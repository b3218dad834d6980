"""The paged KV cache's bookkeeping: fixed-size blocks, reference counts and the prefix cache.

Plain Python (no torch). A block holds `block_size` consecutive tokens of one sequence. A full block
is identified by a hash of its tokens and its parent block's hash, so equal prefixes map to equal
chains of hashes and can share physical blocks. Blocks whose reference count drops to zero stay in the
prefix cache, in a least-recently-freed queue; allocation takes blocks from the front of that queue and
evicts whatever they cached.

Block 0 is reserved: it is never allocated, and padded rows of a batch (CUDA-graph padding) write
their throw-away keys and values there.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from afm.engine.request import Request

NULL_BLOCK = 0


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None
    token_ids: tuple[int, ...] | None = None  # kept with the hash so that a hash collision is detected


def hash_block(parent_hash: int | None, token_ids: tuple[int, ...]) -> int:
    return hash((parent_hash, token_ids))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 2:
            raise ValueError(f"the KV cache needs at least 2 blocks (one is reserved), got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.blocks[NULL_BLOCK].ref_count = 1  # never freed, never allocated
        # Free blocks in least-recently-freed order; O(1) removal when a cached block is reused.
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(1, num_blocks))
        self.cached: dict[int, int] = {}  # block hash -> block id
        self.prefix_hits = 0  # tokens served from the prefix cache, for metrics
        self.prefix_queries = 0

    # ---- capacity ---------------------------------------------------------------------------

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        """Fraction of usable blocks held by requests (cached-but-free blocks count as free)."""
        return 1.0 - self.num_free_blocks / self.num_usable_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- prefix cache -----------------------------------------------------------------------

    def _extend_hashes(self, request: Request, num_full_blocks: int) -> None:
        """Compute the request's block hashes up to `num_full_blocks`, each once in its lifetime."""
        hashes = request.block_hashes
        bs = self.block_size
        for i in range(len(hashes), num_full_blocks):
            parent = hashes[-1] if hashes else None
            hashes.append(hash_block(parent, tuple(request.token_slice(i * bs, (i + 1) * bs))))

    def find_cached_prefix(self, request: Request) -> list[int]:
        """Physical blocks already holding a prefix of the request's tokens (full blocks only).

        At least one token is always left to compute, because its logits are needed to sample. A request
        that asks for prompt logprobs reuses only blocks before the first position whose logits it lacks.
        """
        if not self.enable_prefix_caching:
            return []
        max_blocks = (request.num_tokens - 1) // self.block_size
        if request.num_prompt_logprobs_pending:
            assert request.prompt_logprobs is not None
            max_blocks = min(max_blocks, len(request.prompt_logprobs) // self.block_size)
        self._extend_hashes(request, max_blocks)
        found: list[int] = []
        bs = self.block_size
        for i in range(max_blocks):
            block_id = self.cached.get(request.block_hashes[i])
            if block_id is None or self.blocks[block_id].token_ids != tuple(request.token_slice(i * bs, (i + 1) * bs)):
                break
            found.append(block_id)
        self.prefix_queries += request.num_tokens
        self.prefix_hits += len(found) * self.block_size
        return found

    def cache_full_blocks(self, request: Request) -> None:
        """Register the request's newly completed blocks in the prefix cache: blocks whose keys and values
        are computed (or queued on the device) and whose tokens are known (with asynchronous scheduling a
        computed position may hold a token still in flight)."""
        if not self.enable_prefix_caching:
            return
        n_full = min(request.num_computed_tokens, request.num_tokens) // self.block_size
        if n_full <= request.num_registered_blocks:
            return
        self._extend_hashes(request, n_full)
        bs = self.block_size
        for i in range(request.num_registered_blocks, n_full):
            block = self.blocks[request.block_ids[i]]
            h = request.block_hashes[i]
            if block.block_hash is None and h not in self.cached:
                block.block_hash, block.token_ids = h, tuple(request.token_slice(i * bs, (i + 1) * bs))
                self.cached[h] = block.block_id
        request.num_registered_blocks = n_full

    # ---- allocation -------------------------------------------------------------------------

    def can_allocate(self, request: Request, num_new_tokens: int, cached_blocks: list[int] | None = None) -> bool:
        cached_blocks = cached_blocks or []
        held = len(request.block_ids) + len(cached_blocks)
        need = self.blocks_needed(request.num_computed_tokens + len(cached_blocks) * self.block_size
                                  + num_new_tokens) - held
        # Cached blocks that sit in the free queue are taken out of it, so they count against it too.
        reclaimed = sum(1 for b in cached_blocks if self.blocks[b].ref_count == 0)
        return need <= self.num_free_blocks - reclaimed

    def allocate(self, request: Request, num_new_tokens: int, cached_blocks: list[int] | None = None) -> bool:
        """Give the request blocks for `num_new_tokens` more tokens (after taking `cached_blocks`, a
        prefix-cache hit, as its first blocks). Returns False, changing nothing, if there are too few."""
        if not cached_blocks and request.num_computed_tokens + num_new_tokens <= len(request.block_ids) * self.block_size:
            return True  # the common decode step: the new token fits in the last block
        cached_blocks = cached_blocks or []
        if not self.can_allocate(request, num_new_tokens, cached_blocks):
            return False
        for block_id in cached_blocks:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free_queue[block_id]
            block.ref_count += 1
            request.block_ids.append(block_id)
        if cached_blocks:
            request.num_computed_tokens += len(cached_blocks) * self.block_size
            request.num_cached_tokens = request.num_computed_tokens
            request.num_registered_blocks = len(cached_blocks)
        need = self.blocks_needed(request.num_computed_tokens + num_new_tokens) - len(request.block_ids)
        for _ in range(need):
            block_id, _ = self.free_queue.popitem(last=False)
            block = self.blocks[block_id]
            if block.block_hash is not None:  # evict what it cached
                if self.cached.get(block.block_hash) == block_id:
                    del self.cached[block.block_hash]
                block.block_hash = block.token_ids = None
            block.ref_count = 1
            request.block_ids.append(block_id)
        return True

    def free(self, request: Request) -> None:
        """Release the request's blocks. The tail is released first, so under pressure the end of a
        sequence is evicted before its (more shareable) beginning."""
        for block_id in reversed(request.block_ids):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_queue[block_id] = None
        request.block_ids = []
        request.num_registered_blocks = 0

    def reset_prefix_cache(self) -> None:
        for block_id in self.free_queue:
            block = self.blocks[block_id]
            block.block_hash = block.token_ids = None
        self.cached = {h: b for h, b in self.cached.items() if self.blocks[b].ref_count > 0}

    def check_invariants(self) -> None:
        """Consistency checks used by tests: every usable block is either free or referenced."""
        for block in self.blocks[1:]:
            in_free = block.block_id in self.free_queue
            if in_free != (block.ref_count == 0):
                raise AssertionError(f"block {block.block_id}: ref_count {block.ref_count}, in free queue {in_free}")
        for h, b in self.cached.items():
            if self.blocks[b].block_hash != h:
                raise AssertionError(f"prefix cache maps {h} to block {b}, which holds {self.blocks[b].block_hash}")
