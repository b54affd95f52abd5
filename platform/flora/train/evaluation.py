"""Held-out loss and perplexity of many adapters in shared forward passes.

Scoring adapter ``i`` on language ``L`` is a *job* ``(windows, slot)``. Rows of all jobs are
packed into the same batches with a per-token slot index (``-1`` = the base model), so one pass
scores the base and every adapter at once — FLoRA's batching, applied to evaluation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from flora.adapters import AdapterBatch
from flora.adapters.batch import NO_ADAPTER
from flora.model.model import GPTBigCode


@dataclass(frozen=True)
class Job:
    """Score ``windows [n, S + 1]`` with the adapter in ``slot`` (``-1``: the base model)."""

    windows: torch.Tensor
    slot: int = NO_ADAPTER


@torch.no_grad()
def mean_losses(model: GPTBigCode, jobs: Sequence[Job], *, max_rows: int = 32) -> list[float]:
    """Mean next-token cross-entropy of each job, every window weighted by its tokens.

    Rows of equal length from all jobs share batches of up to ``max_rows``; the result does not
    depend on how jobs are mixed (each row's loss is computed on its own).
    """
    was_training = model.training
    model.eval()
    rows = [(j, w, job.slot) for j, job in enumerate(jobs) for w in job.windows]
    sums = [0.0] * len(jobs)
    counts = [0] * len(jobs)
    by_length: dict[int, list[tuple[int, torch.Tensor, int]]] = {}
    for row in rows:
        by_length.setdefault(row[1].shape[0], []).append(row)
    try:
        for length, group in by_length.items():
            for start in range(0, len(group), max_rows):
                chunk = group[start : start + max_rows]
                ids = torch.stack([w for _, w, _ in chunk]).to(model.device)
                seq = length - 1
                slots = torch.tensor([s for _, _, s in chunk]).repeat_interleave(seq)
                batch = AdapterBatch.from_slots(slots, device=ids.device)
                logits = model(ids[:, :-1], batch)
                ce = F.cross_entropy(
                    logits.flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none"
                ).view(len(chunk), seq)
                for (j, _, _), total in zip(chunk, ce.sum(dim=1).tolist(), strict=True):
                    sums[j] += total
                    counts[j] += seq
    finally:
        model.train(was_training)
    return [s / c if c else math.nan for s, c in zip(sums, counts, strict=True)]


@dataclass(frozen=True)
class Score:
    language: str
    adapter: str  # "base" for the model without adapters
    loss: float
    tokens: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)


def score_adapters(
    model: GPTBigCode,
    held_out: Mapping[str, torch.Tensor],
    adapters: Mapping[str, int],
    *,
    include_base: bool = True,
    max_rows: int = 32,
) -> list[Score]:
    """Held-out loss of the base and of every adapter (name → slot) on every language's windows."""
    names = (["base"] if include_base else []) + list(adapters)
    slots = {"base": NO_ADAPTER, **adapters}
    pairs = [(lang, name) for lang in held_out for name in names]
    jobs = [Job(held_out[lang], slots[name]) for lang, name in pairs]
    losses = mean_losses(model, jobs, max_rows=max_rows)
    return [
        Score(lang, name, loss, held_out[lang][:, 1:].numel())
        for (lang, name), loss in zip(pairs, losses, strict=True)
    ]


def scores_table(scores: Sequence[Score]) -> list[str]:
    """A markdown table: one row per language, loss (perplexity) per adapter."""
    languages = list(dict.fromkeys(s.language for s in scores))
    adapters = list(dict.fromkeys(s.adapter for s in scores))
    cell = {(s.language, s.adapter): s for s in scores}
    lines = [
        "| language | tokens | " + " | ".join(adapters) + " |",
        "|---|---:|" + "---:|" * len(adapters),
    ]
    for lang in languages:
        tokens = next(s.tokens for s in scores if s.language == lang)
        values = [
            f"{cell[lang, a].loss:.3f} ({cell[lang, a].perplexity:,.1f})"
            if (lang, a) in cell
            else ""
            for a in adapters
        ]
        lines.append(f"| {lang} | {tokens:,} | " + " | ".join(values) + " |")
    return lines
