"""Bookkeeping for the paged KV pool: which blocks are free, and who holds the rest."""

from __future__ import annotations


class OutOfBlocks(Exception):
    """Not enough free KV blocks; the scheduler preempts or waits."""


class BlockAllocator:
    """A free list over ``num_blocks`` fixed-size blocks; O(1) allocate and free.

    It also remembers which blocks were freed since the last :meth:`take_freed`, so the engine
    can zero them in the pool before anything writes into them again. The pool's null block is
    not one of these blocks: it is never handed out.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be at least 1")
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self._used: set[int] = set()
        self._freed: set[int] = set()  # freed since the last scrub

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise OutOfBlocks(f"need {count} KV blocks, {len(self._free)} free")
        blocks = [self._free.pop() for _ in range(count)]
        self._used.update(blocks)
        return blocks

    def free(self, blocks: list[int]) -> None:
        for b in blocks:
            if b not in self._used:
                raise ValueError(f"block {b} is not allocated (double free?)")
            self._used.remove(b)
            self._free.append(b)
            self._freed.add(b)

    def take_freed(self) -> list[int]:
        """Blocks freed since the last call (each once); the caller scrubs them."""
        freed, self._freed = sorted(self._freed), set()
        return freed
