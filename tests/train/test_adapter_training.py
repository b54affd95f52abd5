"""Adapter training: gradients through the bank, batched = one by one, resumable, PEFT files."""

from __future__ import annotations

import json
import math

import pytest
import torch

from flora.adapters.bank import AdapterBank, BankConfig
from flora.adapters.weights import AdapterKind, FloraWeights, IA3Weights, LoraWeights
from flora.model.adapter_files import load_adapter_dir
from flora.model.checkpoint import load_model
from flora.train.adapter_training import PAPER_LR, AdapterTrainer, TrainConfig
from flora.train.datasets import LanguageData, heldout_windows
from flora.train.training_run import CHECKPOINT, CheckpointMismatch, train_adapters

KINDS = [AdapterKind.FLORA, AdapterKind.LORA, AdapterKind.IA3]


def _data(micro_model, names=("perl", "tcl", "javascript")) -> dict[str, LanguageData]:
    """Synthetic token streams with a per-language pattern, so adapters have something to learn."""
    vocab = load_model(micro_model).args.vocab_size
    out = {}
    for i, name in enumerate(names):
        gen = torch.Generator().manual_seed(i)
        period = 5 + 3 * i
        base = torch.randint(0, vocab, (period,), generator=gen)
        stream = base.repeat(4000 // period + 1)
        noise = torch.rand(stream.shape, generator=gen) < 0.2
        stream = torch.where(noise, torch.randint(0, vocab, stream.shape, generator=gen), stream)
        out[name] = LanguageData(name, stream[:3000], stream[3000:], (3, 1))
    return out


def _config(kind: AdapterKind, **kw) -> TrainConfig:
    lr = {AdapterKind.FLORA: 2e-2, AdapterKind.LORA: 2e-3, AdapterKind.IA3: 2e-2}[kind]
    defaults = dict(
        kind=kind,
        rank=1 if kind is AdapterKind.IA3 else 2,
        steps=6,
        batch_size=2,
        seq_len=32,
        warmup_steps=2,
        lr=lr,
        seed=3,
    )
    return TrainConfig(**{**defaults, **kw})


@pytest.mark.parametrize("kind", KINDS)
def test_bank_export_inverts_load(kind: AdapterKind) -> None:
    gen = torch.Generator().manual_seed(0)
    bank = AdapterBank(12, 20, BankConfig(max_slots=3, max_rank=4))
    if kind is AdapterKind.FLORA:
        w = FloraWeights(torch.randn(3, 12, generator=gen), torch.randn(20, 3, generator=gen))
    elif kind is AdapterKind.LORA:
        w = LoraWeights(
            torch.randn(3, 12, generator=gen), torch.randn(20, 3, generator=gen), 5.0, True
        )
    else:
        w = IA3Weights(torch.rand(12, generator=gen), feedforward=True)
    bank.load(1, w)
    back = bank.export(1)
    assert type(back) is type(w)
    for field in ("A", "B", "scale"):
        if isinstance(getattr(w, field, None), torch.Tensor):
            torch.testing.assert_close(getattr(back, field), getattr(w, field))
    if kind is AdapterKind.LORA:
        assert (back.alpha, back.use_rslora) == (5.0, True)
    assert bank.export(0) is None


def test_paper_learning_rates_are_the_defaults() -> None:
    assert TrainConfig(kind="flora").learning_rate == 8e-3
    assert TrainConfig(kind="ia3").learning_rate == 5e-3
    assert TrainConfig(kind="lora").learning_rate == 1e-4
    assert TrainConfig(kind="lora", lr=3e-3).learning_rate == 3e-3
    assert set(PAPER_LR) == set(AdapterKind)
    with pytest.raises(ValueError, match="IA3 adapters have no rank"):
        TrainConfig(kind="ia3", rank=4)


@pytest.mark.parametrize("kind", KINDS)
def test_initial_adapter_is_the_base_model(micro_model, kind: AdapterKind) -> None:
    """FLoRA's identity init, LoRA's B = 0 and IA3's ones all start exactly at the base model."""
    model = load_model(micro_model)
    ids = torch.randint(0, model.args.vocab_size, (2, 16))
    base = model(ids)
    trainer = AdapterTrainer(model, _config(kind), ["a", "b"])
    for slot in (0, 1):
        loss = trainer.loss_per_adapter([ids[:, :9] if s == slot else ids[:0, :9] for s in (0, 1)])
        assert torch.isfinite(loss[slot])
    from flora.adapters import AdapterBatch

    adapted = model(ids, AdapterBatch.from_slots(torch.tensor([0, 1]).repeat_interleave(16)))
    torch.testing.assert_close(adapted, base, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_match_a_materialised_float64_reference(micro_model, kind: AdapterKind) -> None:
    """∂loss/∂adapter through the bank equals autograd through W ∘ M / W + ΔW / IA3 in float64."""
    model = load_model(micro_model, dtype=torch.float64)
    config = _config(kind, rank=1 if kind is AdapterKind.IA3 else 3)
    trainer = AdapterTrainer(model, config, ["only"])
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # move away from the init so every factor gets a gradient
        for _, table, _ in trainer.tables:
            table[1:].add_(0.1 * torch.randn(table[1:].shape, generator=gen, dtype=table.dtype))
    ids = torch.randint(0, model.args.vocab_size, (2, 17), generator=gen)
    trainer.loss_per_adapter([ids])[0].backward()
    got = {name: t.grad[1].clone() for name, t, _ in trainer.tables}

    # Reference: a plain model whose adapted weights are materialised from leaf factors.
    ref = load_model(micro_model, dtype=torch.float64)
    exported = model.export_adapter(0)
    leaves, originals = {}, {}
    for path, w in exported.items():
        linear = ref.get_submodule(path)
        originals[path] = linear.weight.detach().clone(), linear.bias.detach().clone()
        if isinstance(w, IA3Weights):
            leaves[path] = (w.scale.clone().requires_grad_(),)
        else:
            leaves[path] = (w.A.clone().requires_grad_(), w.B.clone().requires_grad_())

    def forward():
        for path, w in exported.items():
            linear = ref.get_submodule(path)
            W, b = originals[path]
            del linear.weight, linear.bias
            if isinstance(w, FloraWeights):
                A, B = leaves[path]
                linear.weight, linear.bias = W * (B @ A) / A.shape[0], b
            elif isinstance(w, LoraWeights):
                A, B = leaves[path]
                linear.weight, linear.bias = W + w.scale * (B @ A), b
            else:
                (ia3,) = leaves[path]
                linear.weight, linear.bias = W * ia3[:, None], b * ia3
        logits = ref(ids[:, :-1])
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())

    forward().backward()
    for path, w in exported.items():
        if isinstance(w, IA3Weights):
            torch.testing.assert_close(got[f"{path}.ia3_out"], leaves[path][0].grad)
            continue
        A, B = leaves[path]
        tag = "flora" if isinstance(w, FloraWeights) else "lora"
        r = A.shape[0]
        torch.testing.assert_close(got[f"{path}.{tag}_A"], A.grad)
        # the bank stores Bᵀ/r (FLoRA) or scale·Bᵀ (LoRA): chain rule back to B
        factor = r if tag == "flora" else 1.0 / w.scale
        torch.testing.assert_close(got[f"{path}.{tag}_Bt"], B.grad.T * factor)


@pytest.mark.parametrize("kind", KINDS)
def test_batched_training_equals_one_by_one(micro_model, tmp_path, kind: AdapterKind) -> None:
    """Three languages trained in one run give each adapter what training it alone gives."""
    data = _data(micro_model)
    config = _config(kind)
    together = train_adapters(
        load_model(micro_model), config, data, tmp_path / "together", progress=False
    )
    for name in data:
        alone = train_adapters(
            load_model(micro_model), config, {name: data[name]}, tmp_path / name, progress=False
        )
        args = load_model(micro_model).args
        a = load_adapter_dir(together.adapters[name], args).layers
        b = load_adapter_dir(alone.adapters[name], args).layers
        assert a.keys() == b.keys()
        for path in a:
            for field in ("A", "B", "scale"):
                if isinstance(getattr(a[path], field, None), torch.Tensor):
                    torch.testing.assert_close(
                        getattr(a[path], field), getattr(b[path], field), atol=2e-5, rtol=1e-4
                    )
        assert math.isclose(together.held_out[name], alone.held_out[name], rel_tol=1e-4)
    # and training did something: weights moved and held-out loss went down for each
    assert all(together.held_out[n] < together.base_held_out[n] for n in data)


def test_resume_equals_an_uninterrupted_run(micro_model, tmp_path, monkeypatch) -> None:
    data = _data(micro_model, ("perl", "tcl"))
    config = _config(AdapterKind.FLORA, steps=8)
    full = train_adapters(
        load_model(micro_model),
        config,
        data,
        tmp_path / "full",
        progress=False,
        checkpoint_every=4,
    )
    # Interrupt a run after 4 steps (a ^C in the user's shell), then run it again.
    part, steps_run = tmp_path / "part", []
    original = AdapterTrainer.step

    def interrupted_after_four(self, windows):
        if self.step_count == 4:
            raise KeyboardInterrupt
        steps_run.append(self.step_count)
        return original(self, windows)

    with monkeypatch.context() as patch:
        patch.setattr(AdapterTrainer, "step", interrupted_after_four)
        with pytest.raises(KeyboardInterrupt):
            train_adapters(
                load_model(micro_model), config, data, part, progress=False, checkpoint_every=4
            )
    assert (part / CHECKPOINT).is_file() and steps_run == [0, 1, 2, 3]
    resumed = train_adapters(
        load_model(micro_model), config, data, part, progress=False, checkpoint_every=4
    )
    assert resumed.resumed_from == 4
    # the run's training time counts the interrupted session too
    assert resumed.seconds > 0 and json.loads((part / "perl" / "training.json").read_text())[
        "train_seconds"
    ] == round(resumed.seconds, 1)
    for name in data:
        assert math.isclose(resumed.held_out[name], full.held_out[name], rel_tol=1e-5)
    with pytest.raises(CheckpointMismatch, match="other settings"):
        train_adapters(
            load_model(micro_model),
            _config(AdapterKind.FLORA, steps=9, seed=4),
            data,
            part,
            progress=False,
        )


def test_the_paper_rate_named_or_implied_is_the_same_run(micro_model, tmp_path) -> None:
    """``--lr 8e-3`` for FLoRA is the default spelled out: it completes the run, never clashes."""
    data = _data(micro_model, ("perl",))
    implied = _config(AdapterKind.FLORA, steps=3, lr=None)
    first = train_adapters(load_model(micro_model), implied, data, tmp_path, progress=False)
    named = implied.model_copy(update={"lr": PAPER_LR[AdapterKind.FLORA]})
    again = train_adapters(load_model(micro_model), named, data, tmp_path, progress=False)
    assert again.resumed_from == 3 and again.held_out == first.held_out
    with pytest.raises(CheckpointMismatch):  # another rate is another run
        other = implied.model_copy(update={"lr": 1e-3})
        train_adapters(load_model(micro_model), other, data, tmp_path, progress=False)


def test_written_adapter_loads_in_peft_and_the_engine(micro_model, tmp_path) -> None:
    """The LoRA a run writes is PEFT's format: PEFT's model gives the same logits as ours."""
    peft = pytest.importorskip("peft")
    from transformers import GPTBigCodeForCausalLM

    data = _data(micro_model, ("perl",))
    result = train_adapters(
        load_model(micro_model), _config(AdapterKind.LORA), data, tmp_path / "run", progress=False
    )
    directory = result.adapters["perl"]
    record = json.loads((directory / "training.json").read_text())
    assert record["steps"] == 6 and record["held_out_loss"] < record["base_held_out_loss"]
    hf = GPTBigCodeForCausalLM.from_pretrained(micro_model)
    peft_model = peft.PeftModel.from_pretrained(hf, directory).eval()
    ours = load_model(micro_model)
    adapter = load_adapter_dir(directory, ours.args)
    ours.enable_adapters(adapter.targets)
    ours.load_adapter(0, adapter.layers)
    ids = torch.randint(0, ours.args.vocab_size, (1, 20))
    from flora.adapters import AdapterBatch

    with torch.no_grad():
        want = peft_model(ids).logits
        got = ours(ids, AdapterBatch.from_slots([0] * 20))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_heldout_windows_are_deterministic_and_disjoint() -> None:
    stream = torch.arange(100)
    w = heldout_windows(stream, 9, 50)
    assert w.shape == (10, 10) and torch.equal(w.flatten(), stream)
    spread = heldout_windows(torch.arange(1000), 9, 7)  # evenly over the stream, no overlap
    assert spread.shape == (7, 10) and spread[-1, -1] == 999
    assert bool((spread[1:, 0] - spread[:-1, 0] >= 10).all())
    assert heldout_windows(torch.arange(5), 9, 3).shape == (1, 5)
    with pytest.raises(ValueError, match="too short"):
        heldout_windows(torch.arange(1), 9, 3)
