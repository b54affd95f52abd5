"""Iteration-level scheduling (Orca/vLLM): which sequences run in the next step, and how much.

Every step: running decodes first (one token each), then running prefills continue in chunks,
then waiting requests are admitted while the token budget, the sequence cap, free KV blocks and
adapter slots allow. When KV blocks run out, the sequence of the tenant holding the most running
sequences (newest first) is preempted and later recomputed. Waiting requests are picked by
priority, then round-robin over tenants, so one tenant's deep queue cannot starve another's.
"""

from __future__ import annotations

import bisect
import itertools
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from flora.engine.adapter_cache import AdapterCache, AdapterLoadError
from flora.engine.blocks import BlockAllocator
from flora.engine.sequence import Sequence, Status


@dataclass(frozen=True)
class ScheduledChunk:
    seq: Sequence
    length: int

    @property
    def samples(self) -> bool:
        """The chunk reaches the sequence's last token, so the step yields its next token."""
        return self.seq.num_computed + self.length == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)  # decodes (length 1) first
    failed: list[tuple[Sequence, str]] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.length for c in self.chunks)


class Scheduler:
    def __init__(
        self,
        allocator: BlockAllocator,
        adapters: AdapterCache | None,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
    ) -> None:
        self.allocator, self.adapters = allocator, adapters
        self.max_num_seqs, self.token_budget = max_num_seqs, max_num_batched_tokens
        self.running: list[Sequence] = []
        self.preempted: deque[Sequence] = deque()
        self.waiting: OrderedDict[str, list[tuple[tuple[int, float, int], Sequence]]] = (
            OrderedDict()
        )
        self._order = itertools.count()

    # --- queue management ------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        queue = self.waiting.setdefault(seq.tenant, [])
        key = (-seq.request.priority, seq.arrival, next(self._order))
        bisect.insort(queue, (key, seq), key=lambda item: item[0])

    def num_waiting(self) -> int:
        return len(self.preempted) + sum(len(q) for q in self.waiting.values())

    def has_work(self) -> bool:
        return bool(self.running or self.preempted or any(self.waiting.values()))

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out of every queue and give back its blocks and adapter slot."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.preempted:
            self.preempted.remove(seq)
        else:
            queue = self.waiting.get(seq.tenant, [])
            for i, (_, s) in enumerate(queue):
                if s is seq:
                    del queue[i]
                    break
        self._free(seq)

    def _free(self, seq: Sequence) -> None:
        if seq.blocks:
            self.allocator.free(seq.blocks)
            seq.blocks = []
        if seq.slot is not None and seq.slot >= 0 and self.adapters is not None:
            self.adapters.release(seq.slot)
        seq.slot = None

    # --- the step's plan -------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.token_budget
        scheduled: set[int] = set()
        decoding = [s for s in self.running if s.is_decoding]
        prefilling = [s for s in self.running if not s.is_decoding]
        for seq in decoding + prefilling:
            if budget <= 0:
                break
            if seq.status is not Status.RUNNING:  # preempted earlier in this loop
                continue
            n = 1 if seq.is_decoding else min(seq.remaining_prefill, budget)
            if not self._reserve(seq, n, scheduled, out):
                continue
            out.chunks.append(ScheduledChunk(seq, n))
            scheduled.add(id(seq))
            budget -= n
        self._admit(out, budget)
        out.chunks.sort(key=lambda c: c.length != 1)  # decodes first (stable)
        return out

    def _reserve(self, seq: Sequence, n: int, scheduled: set[int], out: SchedulerOutput) -> bool:
        """Blocks for ``n`` more tokens of a running sequence, preempting others if needed."""
        need = self.allocator.blocks_for(seq.num_computed + n) - len(seq.blocks)
        while need > self.allocator.num_free:
            victim = self._victim(exclude=scheduled | {id(seq)})
            if victim is None:
                return False
            self._preempt(victim, out)
        if need > 0:
            seq.blocks.extend(self.allocator.allocate(need))
        return True

    def _victim(self, exclude: set[int]) -> Sequence | None:
        candidates = [s for s in self.running if id(s) not in exclude]
        if not candidates:
            return None
        per_tenant: dict[str, int] = {}
        for s in self.running:
            per_tenant[s.tenant] = per_tenant.get(s.tenant, 0) + 1
        return max(
            candidates,
            key=lambda s: (per_tenant[s.tenant], -s.request.priority, s.arrival),
        )

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self._free(seq)
        seq.num_computed = 0
        seq.status = Status.WAITING
        seq.preemptions += 1
        self.preempted.appendleft(seq)
        out.preempted.append(seq)

    def _admit(self, out: SchedulerOutput, budget: int) -> None:
        skipped: set[int] = set()
        while budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self._next_waiting(skipped)
            if seq is None:
                return
            if seq.slot is None and not self._bind_adapter(seq, out):
                skipped.add(id(seq))
                continue
            n = min(seq.remaining_prefill, budget)
            need = self.allocator.blocks_for(seq.num_computed + n)
            if need > self.allocator.num_free:
                self._free(seq)  # keep it queued; nothing to admit until blocks free up
                return
            self._take(seq)
            seq.blocks = self.allocator.allocate(need)
            seq.status = Status.RUNNING
            self.running.append(seq)
            out.chunks.append(ScheduledChunk(seq, n))
            budget -= n

    def _bind_adapter(self, seq: Sequence, out: SchedulerOutput) -> bool:
        ref = seq.adapter_ref
        if ref is None:
            seq.slot = -1
            return True
        assert self.adapters is not None
        try:
            slot = self.adapters.acquire(ref)
        except AdapterLoadError as e:
            self._take(seq)
            out.failed.append((seq, str(e)))
            return False
        if slot is None:
            return False  # still loading, or every slot busy: others go ahead
        seq.slot = slot
        return True

    def _next_waiting(self, skipped: set[int]) -> Sequence | None:
        for seq in self.preempted:
            if id(seq) not in skipped:
                return seq
        best: tuple[int, int] | None = None
        chosen: Sequence | None = None
        for rank, queue in enumerate(self.waiting.values()):
            head = next((s for _, s in queue if id(s) not in skipped), None)
            if head is not None and (best is None or (head.request.priority, -rank) > best):
                best, chosen = (head.request.priority, -rank), head
        return chosen

    def _take(self, seq: Sequence) -> None:
        """Remove an admitted (or failed) sequence from the waiting structures."""
        if seq in self.preempted:
            self.preempted.remove(seq)
            return
        queue = self.waiting[seq.tenant]
        for i, (_, s) in enumerate(queue):
            if s is seq:
                del queue[i]
                break
        self.waiting.move_to_end(seq.tenant)  # round-robin: this tenant goes last
        if not queue:
            del self.waiting[seq.tenant]
