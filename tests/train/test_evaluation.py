"""Held-out scoring: mixing adapters in shared batches gives each one its own loss."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from flora.adapters import BankConfig
from flora.adapters.weights import FloraWeights, LoraWeights
from flora.model.checkpoint import load_model
from flora.train.evaluation import Job, mean_losses, score_adapters, scores_table


def _model_with_two_adapters(micro_model):
    model = load_model(micro_model)
    model.enable_adapters(("c_attn",), BankConfig(max_slots=2, max_rank=4))
    gen = torch.Generator().manual_seed(0)
    for slot, make in enumerate(
        (
            lambda i, o: FloraWeights(
                1 + 0.3 * torch.randn(2, i, generator=gen),
                1 + 0.3 * torch.randn(o, 2, generator=gen),
            ),
            lambda i, o: LoraWeights(
                torch.randn(4, i, generator=gen), 0.1 * torch.randn(o, 4, generator=gen), 8.0
            ),
        )
    ):
        model.load_adapter(
            slot, {p: make(m.in_features, m.out_features) for p, m in model.adapted_layers()}
        )
    return model


def test_shared_batches_equal_separate_scoring(micro_model) -> None:
    model = _model_with_two_adapters(micro_model)
    gen = torch.Generator().manual_seed(1)
    windows = {
        lang: torch.randint(0, model.args.vocab_size, (5, 17), generator=gen)
        for lang in ("perl", "tcl")
    }
    scores = score_adapters(model, windows, {"a": 0, "b": 1}, max_rows=4)  # rows of all mixed
    assert [(s.language, s.adapter) for s in scores] == [
        (lang, name) for lang in ("perl", "tcl") for name in ("base", "a", "b")
    ]
    for s in scores:
        slot = {"base": -1, "a": 0, "b": 1}[s.adapter]
        alone = mean_losses(model, [Job(windows[s.language], slot)], max_rows=1)[0]
        assert math.isclose(s.loss, alone, rel_tol=1e-5)
        assert s.tokens == 5 * 16 and math.isclose(s.perplexity, math.exp(s.loss))
    # the base score is the plain model's cross-entropy
    plain = load_model(micro_model)
    w = windows["tcl"]
    with torch.no_grad():
        want = F.cross_entropy(plain(w[:, :-1]).flatten(0, 1), w[:, 1:].flatten()).item()
    base = next(s for s in scores if s.language == "tcl" and s.adapter == "base")
    assert math.isclose(base.loss, want, rel_tol=1e-5)
    # adapters really change the scores (the check above could not pass by ignoring slots)
    assert len({round(s.loss, 6) for s in scores if s.language == "tcl"}) == 3
    table = scores_table(scores)
    assert table[0] == "| language | tokens | base | a | b |" and len(table) == 4


def test_windows_of_different_lengths_are_scored_apart(micro_model) -> None:
    model = load_model(micro_model)
    short, long = torch.randint(0, 100, (2, 5)), torch.randint(0, 100, (3, 9))
    both = mean_losses(model, [Job(short), Job(long)])
    assert math.isclose(both[0], mean_losses(model, [Job(short)])[0], rel_tol=1e-6)
    assert math.isclose(both[1], mean_losses(model, [Job(long)])[0], rel_tol=1e-6)
