"""LoRA → FLoRA conversion: the ALS fit's guarantees, its weighting, and `flora convert`."""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from flora.adapters import AdapterBatch, AdapterKind, BankConfig, FloraWeights, LoraWeights
from flora.model import load_adapter_dir, load_model, save_adapter_dir
from flora.model.config import ModelArgs
from flora.train import conversion, convert_cli, make_tiny_model
from flora.train.conversion import relative_weight_error, weighted_als, weighted_objective

OUT, IN = 40, 24


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """These matrices are tiny: a second torch thread only spins against other work sharing
    the CPU (10× slower wall time on a busy 2-core machine), so use one, then put it back."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def base(seed: int) -> torch.Tensor:
    return torch.randn(OUT, IN, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def lora_target(W0: torch.Tensor, rank: int, seed: int, size: float = 0.3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(rank, IN, generator=g, dtype=torch.float64)
    B = torch.randn(OUT, rank, generator=g, dtype=torch.float64)
    return W0 + size * B @ A / rank**0.5


def flora_target(W0: torch.Tensor, rank: int, seed: int) -> torch.Tensor:
    """A weight FLoRA represents exactly: ``W0 ∘ (B* A* / r*)``."""
    g = torch.Generator().manual_seed(seed)
    A = 1 + 0.5 * torch.randn(rank, IN, generator=g, dtype=torch.float64)
    B = 1 + 0.5 * torch.randn(OUT, rank, generator=g, dtype=torch.float64)
    return W0 * (B @ A / rank)


# --- the fit -------------------------------------------------------------------------------


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("rank", [1, 3, 8])
def test_als_starts_at_the_base_and_never_increases_the_objective(
    rank: int, weighted: bool
) -> None:
    W0, gen = base(0), torch.Generator().manual_seed(1)
    T = lora_target(W0, 4, seed=2)
    w = torch.rand(1, IN, generator=gen, dtype=torch.float64) * 3 if weighted else None
    history: list[float] = []
    fit = weighted_als(W0, T, rank, weights=w, iters=60, tol=0.0, history=history)
    identity = weighted_objective(W0, T, torch.ones_like(W0), w)
    assert history[0] == pytest.approx(identity, rel=1e-12)
    assert 2 <= len(history) <= 61  # tol=0 stops only once a round gains nothing
    for before, after in itertools.pairwise(history):
        assert after <= before + 1e-12 * history[0]
    assert history[-1] < history[0]
    assert weighted_objective(W0, T, fit.multiplier(), w) == pytest.approx(history[-1], rel=1e-9)
    assert relative_weight_error(W0, T, fit, weights=w) < 1.0


@pytest.mark.parametrize(("true_rank", "rank"), [(1, 1), (2, 2), (2, 4), (3, 8)])
def test_recovers_a_flora_representable_weight_exactly(true_rank: int, rank: int) -> None:
    W0 = base(3)
    T = flora_target(W0, true_rank, seed=4)
    fit = weighted_als(W0, T, rank, iters=400, tol=1e-15)
    assert relative_weight_error(W0, T, fit) < 1e-6
    assert torch.allclose(W0 * fit.multiplier(), T, atol=1e-6)


def test_objective_and_error_match_a_brute_force_reference() -> None:
    gen = torch.Generator().manual_seed(5)
    W0 = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    T = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    w = torch.rand(1, 4, generator=gen, dtype=torch.float64)
    fit = weighted_als(W0, T, 2, weights=w, iters=5)
    A, B = fit.A.tolist(), fit.B.tolist()
    total = delta = 0.0
    for i in range(5):
        for j in range(4):
            m = sum(B[i][k] * A[k][j] for k in range(2)) / 2
            total += float(w[0, j]) * (float(W0[i, j]) * m - float(T[i, j])) ** 2
            delta += float(w[0, j]) * (float(T[i, j]) - float(W0[i, j])) ** 2
    assert weighted_objective(W0, T, fit.multiplier(), w) == pytest.approx(total, rel=1e-12)
    assert relative_weight_error(W0, T, fit, weights=w) == pytest.approx(
        (total / delta) ** 0.5, rel=1e-12
    )


def test_higher_rank_is_never_worse() -> None:
    W0 = base(6)
    T = lora_target(W0, 8, seed=7)
    errors = [relative_weight_error(W0, T, weighted_als(W0, T, r, iters=200)) for r in range(1, 9)]
    for lower, higher in itertools.pairwise(errors):
        assert higher <= lower + 1e-9, errors
    assert errors[-1] < errors[0]


def test_returns_the_input_dtype_and_validates_shapes() -> None:
    W0 = base(8).float()
    fit = weighted_als(W0, lora_target(W0.double(), 2, 9).float(), 4, iters=3)
    assert fit.A.dtype == fit.B.dtype == torch.float32
    fit.validate(IN, OUT)
    with pytest.raises(ValueError, match="same"):
        weighted_als(W0, W0[:, :3], 2)
    with pytest.raises(ValueError, match="rank"):
        weighted_als(W0, W0, 0)


def test_activation_weights_spend_the_rank_where_inputs_are_large() -> None:
    W0 = base(10)
    T = lora_target(W0, 8, seed=11)
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(500, IN, generator=gen, dtype=torch.float64)
    x = x * torch.exp(1.5 * torch.randn(IN, generator=gen, dtype=torch.float64))  # skewed inputs
    s = conversion.input_weights(x)
    assert torch.allclose(s, (x**2).mean(0))
    plain = weighted_als(W0, T, 4)
    weighted = weighted_als(W0, T, 4, weights=s[None, :])
    # Each solution wins on its own objective, and the weighted one on the outputs it targets.
    assert relative_weight_error(W0, T, weighted, weights=s[None, :]) < relative_weight_error(
        W0, T, plain, weights=s[None, :]
    )
    assert relative_weight_error(W0, T, plain) < relative_weight_error(W0, T, weighted)

    def output_error(fit: FloraWeights) -> float:
        return float((x @ (W0 * fit.multiplier() - T).T).norm())

    assert output_error(weighted) < output_error(plain)


# --- on a model ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def micro_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("micro") / "model"
    return make_tiny_model(out, preset="micro", languages=["python", "c"], progress=False)


def random_lora(args: ModelArgs, rank: int, seed: int, size: float = 0.02) -> dict:
    """Small random LoRA deltas on c_attn: small enough that logits respond almost linearly,
    so a better weight fit shows as closer logits."""
    g = torch.Generator().manual_seed(seed)
    e, qkv = args.n_embd, args.n_embd + 2 * args.head_dim
    return {
        f"transformer.h.{i}.attn.c_attn": LoraWeights(
            torch.randn(rank, e, generator=g) * e**-0.5,
            torch.randn(qkv, rank, generator=g) * size,
            alpha=2.0 * rank,
        )
        for i in range(args.n_layer)
    }


def convert(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="flora")
    convert_cli.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["convert", *argv])
    return args.handler(args)


def test_calibration_loop_mirrors_the_model_forward(micro_dir: Path) -> None:
    model = load_model(micro_dir)
    ids = torch.randint(0, model.args.vocab_size, (2, 16), generator=torch.Generator())
    inputs, logits = conversion.dense_layer_inputs(model, ids)
    torch.testing.assert_close(logits, model(ids), rtol=0, atol=1e-5)
    n = model.args.n_layer
    assert len(inputs) == 4 * n
    s = conversion.collect_calibration(model, ids, batch_size=1)
    path = "transformer.h.0.attn.c_attn"
    torch.testing.assert_close(s[path], conversion.input_weights(inputs[path]))
    assert s["transformer.h.0.mlp.c_proj"].shape == (model.args.inner,)


@pytest.mark.parametrize(("calibration", "distill"), [(0, 0), (4, 0), (4, 3)])
def test_convert_cli_end_to_end(
    micro_dir: Path, tmp_path: Path, calibration: int, distill: int, capsys: pytest.CaptureFixture
) -> None:
    model = load_model(micro_dir)
    lora = random_lora(model.args, rank=8, seed=13)
    save_adapter_dir(tmp_path / "lora", AdapterKind.LORA, lora, base_model=str(micro_dir))
    argv = [str(tmp_path / "lora"), str(tmp_path / "flora"), "--model", str(micro_dir)]
    argv += ["--rank", "16", "--calibration-windows", str(calibration), "--seq-len", "32"]
    argv += ["--distill-steps", str(distill)]
    assert convert(argv) == 0
    printed = capsys.readouterr().out
    assert "transformer.h.1.attn.c_attn" in printed and "mean" in printed

    converted = load_adapter_dir(tmp_path / "flora", model.args)
    assert converted.kind is AdapterKind.FLORA and converted.rank == 16
    assert converted.config["reduction"] == "mean"
    assert converted.config["converted_from"]["weighting"] == (
        "activation" if calibration else "plain"
    )

    model.enable_adapters(("c_attn",), BankConfig(max_slots=2, max_rank=16))
    model.load_adapter(0, lora)
    model.load_adapter(1, converted.layers)
    ids = torch.randint(
        0, model.args.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0)
    )
    n = ids.numel()
    with torch.no_grad():
        want = model(ids, AdapterBatch.from_slots([0] * n))
        got = model(ids, AdapterBatch.from_slots([1] * n))
        plain = model(ids)
    assert (got - want).abs().mean() < 0.9 * (plain - want).abs().mean()


def test_distill_moves_the_converted_logits_toward_the_lora(micro_dir: Path) -> None:
    model = load_model(micro_dir)
    lora = random_lora(model.args, rank=4, seed=14, size=0.1)
    flora = conversion.convert_lora(model, lora, 2, iters=20)
    ids = torch.randint(
        0, model.args.vocab_size, (4, 24), generator=torch.Generator().manual_seed(1)
    )
    refined = conversion.distill(model, lora, flora, ids, steps=8, lr=1e-2)
    assert not model.adapter_targets  # the caller's model is untouched

    model.enable_adapters(("c_attn",), BankConfig(max_slots=3, max_rank=4))
    model.load_adapter(0, lora)
    model.load_adapter(1, flora)
    model.load_adapter(2, refined)
    n = ids.numel()
    with torch.no_grad():
        p = [F.log_softmax(model(ids, AdapterBatch.from_slots([s] * n)), -1) for s in range(3)]
    kl = [F.kl_div(q, p[0], log_target=True, reduction="batchmean") for q in p[1:]]
    assert kl[1] < kl[0]


def test_convert_lora_refuses_layers_the_model_lacks(micro_dir: Path) -> None:
    model = load_model(micro_dir)
    lora = random_lora(model.args, rank=2, seed=15)
    with pytest.raises(ValueError, match="no layer"):
        conversion.convert_lora(model, {"transformer.h.9.attn.c_attn": lora.popitem()[1]}, 2)
    with pytest.raises(ValueError, match="calibration"):
        conversion.convert_lora(model, lora, 2, calibration={})


def test_convert_cli_errors(micro_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = ModelArgs.from_dir(micro_dir)
    out, model = str(tmp_path / "out"), ["--model", str(micro_dir), "--rank", "2"]
    g = torch.Generator().manual_seed(16)
    e, qkv = args.n_embd, args.n_embd + 2 * args.head_dim
    not_lora = {"transformer.h.0.attn.c_attn": FloraWeights.identity(2, e, qkv, generator=g)}
    save_adapter_dir(tmp_path / "flora", AdapterKind.FLORA, not_lora)
    other = ModelArgs(**{**args.model_dump(), "n_embd": 32, "n_head": 2})
    save_adapter_dir(tmp_path / "wrong-base", AdapterKind.LORA, random_lora(other, 2, 17))
    cases = {
        str(tmp_path / "flora"): "takes a LoRA adapter",
        str(tmp_path / "wrong-base"): "for the base model",
        str(tmp_path / "missing"): "not found",
    }
    for lora_dir, message in cases.items():
        assert convert([lora_dir, out, *model]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, err
    save_adapter_dir(tmp_path / "lora", AdapterKind.LORA, random_lora(args, 2, 18))
    assert convert([str(tmp_path / "lora"), out, "--model", str(micro_dir), "--rank", "0"]) == 2
    assert "--rank" in capsys.readouterr().err
    assert convert([str(tmp_path / "lora"), out, *model, "--distill-steps", "2"]) == 2
    assert "--calibration-windows" in capsys.readouterr().err
    assert not Path(out).exists()


def test_calibration_and_held_out_windows_follow_the_training_split(micro_dir: Path) -> None:
    """The report's held-out windows are `flora train`'s held-out files, never its training text,
    so a converted adapter is scored on text neither the LoRA nor the calibration saw."""
    from flora.model.tokenizer import Tokenizer
    from flora.train.datasets import heldout_windows, load_language_data

    data = load_language_data(Tokenizer.from_dir(micro_dir), None, ["python"])["python"]
    text = convert_cli.corpus(micro_dir, "python")
    assert torch.equal(text.train, data.train) and torch.equal(text.held_out, data.held_out)
    calibration = convert_cli.corpus_windows(text, 6, 32, seed=3)
    held = convert_cli.corpus_windows(text, 6, 32, held_out=True)
    assert calibration.shape == (6, 33) and held.shape == (6, 33)

    def inside(window: torch.Tensor, stream: torch.Tensor) -> bool:
        return bool(stream.unfold(0, window.numel(), 1).eq(window).all(dim=1).any())

    assert all(inside(w, data.train) for w in calibration)
    assert not any(inside(w, data.held_out) for w in calibration)
    # the windows `flora eval loss` and Table 1 score: spread over the held-out files
    assert torch.equal(held, heldout_windows(data.held_out, 32, 6))
    # the same seed draws the same calibration windows
    assert torch.equal(calibration, convert_cli.corpus_windows(text, 6, 32, seed=3))
