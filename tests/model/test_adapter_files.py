"""Adapter directories: what the real ``peft`` library saves loads here and gives PEFT's logits.

LoRA and IA3 adapters are made and saved by ``peft`` itself on transformers' GPTBigCode, then
served by our model from a bank slot; FLoRA is checked against the materialised adapted weight
in float64. Then a mixed batch (dense and paged), and round trips (ours → PEFT as well).
Bad and hostile files are in test_adapter_file_errors.py.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytest
import torch
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from flora.adapters import (
    AdapterBatch,
    AdapterKind,
    BankConfig,
    FloraWeights,
    IA3Weights,
    LoraWeights,
)
from flora.adapters.reference import adapted_weight
from flora.model import GPTBigCode, load_adapter_dir, load_model, save_adapter_dir
from tests.model.conftest import CONFIGS, FP32_ATOL, hf_model, max_diff, random_ids
from tests.model.test_model_vs_hf import Sequence, run_schedule

# peft calls a transformers API that transformers 5 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing`:FutureWarning")
ARGS = CONFIGS["mqa"]
E, QKV, INNER = ARGS.n_embd, ARGS.n_embd + 2 * ARGS.head_dim, ARGS.inner
BANK = BankConfig(max_slots=4, max_rank=8)
C_ATTN = [f"transformer.h.{i}.attn.c_attn" for i in range(ARGS.n_layer)]
PREFIX = "base_model.model."


def served(base_dir: Path, targets, *adapters) -> GPTBigCode:
    """Our model from the checkpoint, with ``adapters[i]`` (an ``AdapterFile``) in slot ``i``."""
    net = load_model(base_dir)
    net.enable_adapters(targets, BANK)
    for slot, adapter in enumerate(adapters):
        net.load_adapter(slot, adapter.layers)
    return net


def run_slot(net: GPTBigCode, ids: torch.Tensor, slot: int) -> torch.Tensor:
    return net(ids, AdapterBatch.from_slots([slot] * ids.numel()))


def randomise_peft(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Replace PEFT's init with draws from our seeded generator, far from a no-op adapter."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * p.shape[1] ** -0.5)
            elif "lora_B" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
            elif "ia3_l" in name:
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=gen))


def peft_adapter(base_dir: Path, config, gen, out: Path):
    """A PEFT model with random adapter weights, saved by PEFT to ``out``."""
    model = get_peft_model(hf_model(base_dir), config).eval()
    randomise_peft(model, gen)
    model.save_pretrained(out)
    assert (out / "adapter_model.safetensors").is_file()
    return model


LORA_CASES = {
    "lora-r4": (
        LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], init_lora_weights=False),
        ("c_attn",),
    ),
    "lora-rslora": (
        LoraConfig(
            r=8, lora_alpha=4, target_modules=["c_attn"], use_rslora=True, init_lora_weights=False
        ),
        ("c_attn",),
    ),
    "lora-patterns": (  # per-module rank and alpha, a literal and a regex key, three targets
        LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["c_attn", "c_proj"],
            rank_pattern={r"h\.0\.attn\.c_attn": 2, "h.1.mlp.c_proj": 6},
            alpha_pattern={"h.1.attn.c_attn": 3, r"h\.\d\.mlp\.c_proj": 20},
            init_lora_weights=False,
        ),
        ("c_attn", "attn.c_proj", "mlp.c_proj"),
    ),
}


@pytest.mark.parametrize("case", sorted(LORA_CASES))
def test_peft_lora_equals_peft_logits(case, gen, base_dir, tmp_path):
    config, targets = LORA_CASES[case]
    peft_model = peft_adapter(base_dir, config, gen, tmp_path / "adapter")
    adapter = load_adapter_dir(tmp_path / "adapter", ARGS)
    assert adapter.kind is AdapterKind.LORA
    assert set(adapter.targets) == set(targets)
    assert adapter.rank == max(w.rank for w in adapter.layers.values())

    ids = random_ids(gen, ARGS.vocab_size, 2, 13)
    expected = peft_model(input_ids=ids).logits
    with peft_model.disable_adapter():
        base = peft_model(input_ids=ids).logits
    assert max_diff(expected, base) > 0.1, "the PEFT adapter is (nearly) a no-op"
    net = served(base_dir, targets, adapter)
    assert max_diff(run_slot(net, ids, 0), expected) <= FP32_ATOL
    assert max_diff(run_slot(net, ids, -1), base) <= FP32_ATOL


@pytest.mark.parametrize("feedforward", [["mlp.c_fc"], r".*\.mlp\.c_fc"])
def test_peft_ia3_equals_peft_logits(feedforward, gen, base_dir, tmp_path):
    """Output scaling on c_attn (bias scaled too), input scaling on the feed-forward c_fc."""
    config = IA3Config(
        target_modules=["c_attn", "mlp.c_fc"]
        if isinstance(feedforward, list)
        else r".*\.(attn\.c_attn|mlp\.c_fc)",
        feedforward_modules=feedforward,
    )
    peft_model = peft_adapter(base_dir, config, gen, tmp_path / "adapter")
    adapter = load_adapter_dir(tmp_path / "adapter", ARGS)
    assert adapter.kind is AdapterKind.IA3
    assert adapter.targets == ("c_attn", "mlp.c_fc")
    assert {m: w.feedforward for m, w in adapter.layers.items()} == {
        m: "mlp" in m for m in adapter.layers
    }

    ids = random_ids(gen, ARGS.vocab_size, 2, 13)
    expected = peft_model(input_ids=ids).logits
    with peft_model.disable_adapter():
        assert max_diff(expected, peft_model(input_ids=ids).logits) > 0.1
    net = served(base_dir, ("c_attn", "mlp.c_fc"), adapter)
    assert max_diff(run_slot(net, ids, 0), expected) <= FP32_ATOL


def test_ia3_regex_feedforward_on_square_layer(gen, base_dir, tmp_path):
    """attn.c_proj is square: a wrong feed-forward guess would pass every shape check."""
    config = IA3Config(
        target_modules=r".*\.(attn|mlp)\.c_proj", feedforward_modules=r".*\.mlp\.c_proj"
    )
    peft_model = peft_adapter(base_dir, config, gen, tmp_path / "adapter")
    adapter = load_adapter_dir(tmp_path / "adapter", ARGS)
    assert {m.split(".", 3)[3]: w.feedforward for m, w in adapter.layers.items()} == {
        "attn.c_proj": False,
        "mlp.c_proj": True,
    }
    ids = random_ids(gen, ARGS.vocab_size, 1, 11)
    net = served(base_dir, ("attn.c_proj", "mlp.c_proj"), adapter)
    assert max_diff(run_slot(net, ids, 0), peft_model(input_ids=ids).logits) <= FP32_ATOL


def random_flora(gen: torch.Generator, rank: int, n_in: int = E, n_out: int = QKV):
    return FloraWeights(
        A=1 + 0.5 * torch.randn(rank, n_in, generator=gen),
        B=1 + 0.5 * torch.randn(n_out, rank, generator=gen),
    )


def materialised(base_dir: Path, layers: dict[str, FloraWeights]) -> GPTBigCode:
    """A plain copy of the model whose weights are W ∘ (B A / r), computed in float64."""
    net = load_model(base_dir)
    with torch.no_grad():
        for module, w in layers.items():
            linear = net.get_submodule(module)
            linear.weight.copy_(adapted_weight(linear.weight, w).float())
    return net


@pytest.mark.parametrize("rank", [1, 3, 8])
def test_flora_file_equals_materialised_weights(rank, gen, base_dir, tmp_path):
    layers = {m: random_flora(gen, rank) for m in C_ATTN}
    save_adapter_dir(tmp_path / "flora", AdapterKind.FLORA, layers, base_model=str(base_dir))
    config = json.loads((tmp_path / "flora" / "adapter_config.json").read_text())
    assert config["peft_type"] == "FLORA" and config["reduction"] == "mean"
    assert config["r"] == rank and config["target_modules"] == ["c_attn"]
    adapter = load_adapter_dir(tmp_path / "flora", ARGS)
    assert (adapter.kind, adapter.rank, adapter.targets) == (AdapterKind.FLORA, rank, ("c_attn",))

    ids = random_ids(gen, ARGS.vocab_size, 2, 13)
    expected = materialised(base_dir, layers)(ids)
    assert max_diff(expected, load_model(base_dir)(ids)) > 0.1
    net = served(base_dir, ("c_attn",), adapter)
    assert max_diff(run_slot(net, ids, 0), expected) <= FP32_ATOL


def test_mixed_batch_rows_equal_each_alone(gen, base_dir, tmp_path):
    """Rows of one batch on FLoRA, LoRA, IA3 and no adapter each equal that row run alone."""
    flora_layers = {m: random_flora(gen, 2) for m in C_ATTN}
    save_adapter_dir(tmp_path / "flora", AdapterKind.FLORA, flora_layers)
    lora_cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], init_lora_weights=False)
    lora_peft = peft_adapter(base_dir, lora_cfg, gen, tmp_path / "lora")
    ia3_cfg = IA3Config(target_modules=["c_attn", "mlp.c_fc"], feedforward_modules=["mlp.c_fc"])
    ia3_peft = peft_adapter(base_dir, ia3_cfg, gen, tmp_path / "ia3")
    adapters = [load_adapter_dir(tmp_path / k, ARGS) for k in ("flora", "lora", "ia3")]
    net = served(base_dir, ("c_attn", "mlp.c_fc"), *adapters)

    row_slots = [2, -1, 0, 1, 0, -1]  # repeated slots, and not sorted by slot
    ids = random_ids(gen, ARGS.vocab_size, len(row_slots), 10)
    slots = torch.tensor(row_slots).repeat_interleave(ids.shape[1])
    batch = net(ids, AdapterBatch.from_slots(slots))
    oracles = {
        -1: load_model(base_dir),
        0: materialised(base_dir, flora_layers),
        1: lambda x: lora_peft(input_ids=x).logits,
        2: lambda x: ia3_peft(input_ids=x).logits,
    }
    for row, slot in enumerate(row_slots):
        alone = run_slot(net, ids[row : row + 1], slot)
        assert max_diff(batch[row], alone[0]) <= FP32_ATOL, f"row {row}, slot {slot}"
        assert max_diff(alone, oracles[slot](ids[row : row + 1])) <= FP32_ATOL, f"slot {slot}"
    assert max_diff(batch[0], batch[1]) > 0.1  # rows truly differ


def test_evicted_slot_is_the_base_model(gen, base_dir, tmp_path):
    layers = {m: random_flora(gen, 2) for m in C_ATTN}
    adapter = load_adapter_dir(save_adapter_dir(tmp_path / "a", AdapterKind.FLORA, layers), ARGS)
    net = served(base_dir, ("c_attn",), adapter)
    ids = random_ids(gen, ARGS.vocab_size, 1, 9)
    base = load_model(base_dir)(ids)
    assert max_diff(run_slot(net, ids, 0), base) > 0.1
    net.evict_adapter(0)
    assert max_diff(run_slot(net, ids, 0), base) <= FP32_ATOL


def test_paged_steps_with_mixed_adapters_equal_dense(gen, seed, base_dir, tmp_path):
    """The serving path: sequences on different slots share chunked-prefill/decode steps."""
    adapters = [
        load_adapter_dir(save_adapter_dir(tmp_path / k.value, k, random_layers(k, gen)), ARGS)
        for k in (AdapterKind.FLORA, AdapterKind.LORA, AdapterKind.IA3)
    ]
    net = served(base_dir, ("c_attn", "mlp.c_fc"), *adapters)
    rng = random.Random(seed)
    pool = list(range(40))
    rng.shuffle(pool)
    seqs = []
    for i, (slot, total, prompt) in enumerate([(0, 14, 9), (1, 11, 2), (2, 17, 13), (-1, 8, 5)]):
        tokens = random_ids(gen, ARGS.vocab_size, total).tolist()
        seqs.append(Sequence(tokens, prompt, i % 2, pool[i * 10 : i * 10 + 5], slot=slot))
    run_schedule(net, seqs, block_size=4, rng=rng)
    for s in seqs:
        expected = run_slot(net, torch.tensor([s.tokens]), s.slot)[0]
        for p, row in s.logits.items():
            assert max_diff(row, expected[p]) <= FP32_ATOL, f"slot {s.slot}, position {p}"


# --- round trips ------------------------------------------------------------------------------


def random_layers(kind: AdapterKind, gen: torch.Generator) -> dict:
    if kind is AdapterKind.FLORA:
        return {m: random_flora(gen, 4) for m in C_ATTN}
    if kind is AdapterKind.LORA:
        return {
            m: LoraWeights(
                A=torch.randn(4, E, generator=gen) * E**-0.5,
                B=0.5 * torch.randn(QKV, 4, generator=gen),
                alpha=6.0,
                use_rslora=True,
            )
            for m in C_ATTN
        }
    layers = {m: IA3Weights(1 + 0.5 * torch.randn(QKV, generator=gen)) for m in C_ATTN}
    for i in range(ARGS.n_layer):
        scale = 1 + 0.5 * torch.randn(E, generator=gen)
        layers[f"transformer.h.{i}.mlp.c_fc"] = IA3Weights(scale, feedforward=True)
    return layers


def assert_same_layers(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for module, w in expected.items():
        g = got[module]
        assert type(g) is type(w), module
        if isinstance(w, IA3Weights):
            assert torch.equal(g.scale, w.scale) and g.feedforward == w.feedforward, module
        else:
            assert torch.equal(g.A, w.A) and torch.equal(g.B, w.B), module
        if isinstance(w, LoraWeights):
            assert (g.alpha, g.use_rslora) == (w.alpha, w.use_rslora), module


@pytest.mark.parametrize("kind", list(AdapterKind))
def test_save_load_round_trip(kind, gen, tmp_path):
    layers = random_layers(kind, gen)
    directory = save_adapter_dir(tmp_path / "a", kind, layers, base_model="org/base")
    adapter = load_adapter_dir(directory, ARGS)
    assert adapter.kind is kind
    assert_same_layers(adapter.layers, layers)
    assert adapter.config["base_model_name_or_path"] == "org/base"
    digest = hashlib.sha256((directory / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert adapter.sha256 == digest
    assert adapter.nbytes == sum(
        t.nbytes for t in load_file(directory / "adapter_model.safetensors").values()
    )


def mixed_rank_lora(gen: torch.Generator) -> dict[str, LoraWeights]:
    """Per-module rank and alpha: the file needs PEFT's rank_pattern and alpha_pattern."""
    return {
        C_ATTN[0]: LoraWeights(
            torch.randn(2, E, generator=gen) * E**-0.5,
            0.5 * torch.randn(QKV, 2, generator=gen),
            alpha=3.0,
        ),
        C_ATTN[1]: LoraWeights(
            torch.randn(5, E, generator=gen) * E**-0.5,
            0.5 * torch.randn(QKV, 5, generator=gen),
            alpha=7.0,
        ),
        "transformer.h.1.mlp.c_proj": LoraWeights(
            torch.randn(5, INNER, generator=gen) * INNER**-0.5,
            0.5 * torch.randn(E, 5, generator=gen),
            alpha=3.0,
        ),
    }


def test_lora_round_trip_keeps_per_module_rank_and_alpha(gen, tmp_path):
    layers = mixed_rank_lora(gen)
    adapter = load_adapter_dir(save_adapter_dir(tmp_path / "a", AdapterKind.LORA, layers), ARGS)
    assert_same_layers(adapter.layers, layers)
    assert [w.scale for w in adapter.layers.values()] == [1.5, 1.4, 0.6]


def test_lora_layers_must_agree_on_rslora(gen, tmp_path):
    layers = mixed_rank_lora(gen)
    first = layers[C_ATTN[0]]
    layers[C_ATTN[0]] = LoraWeights(first.A, first.B, first.alpha, use_rslora=True)
    with pytest.raises(ValueError, match="use_rslora"):
        save_adapter_dir(tmp_path / "a", AdapterKind.LORA, layers)


# mixed_rank_lora adapts mlp.c_proj in layer 1 only: PEFT then warns that layer 0's factors are
# missing and leaves them at its init (B = 0, a no-op), which is what the file means.
@pytest.mark.filterwarnings("ignore:Found missing adapter keys:UserWarning")
@pytest.mark.parametrize("case", ["lora", "lora-mixed-rank", "ia3"])
def test_our_files_load_in_peft(case, gen, base_dir, tmp_path):
    kind = AdapterKind.IA3 if case == "ia3" else AdapterKind.LORA
    layers = mixed_rank_lora(gen) if case == "lora-mixed-rank" else random_layers(kind, gen)
    directory = save_adapter_dir(tmp_path / "a", kind, layers, base_model=str(base_dir))
    peft_model = PeftModel.from_pretrained(hf_model(base_dir), directory).eval()
    ids = random_ids(gen, ARGS.vocab_size, 2, 12)
    expected = peft_model(input_ids=ids).logits
    with peft_model.disable_adapter():
        assert max_diff(expected, peft_model(input_ids=ids).logits) > 0.1
    adapter = load_adapter_dir(directory, ARGS)
    net = served(base_dir, adapter.targets, adapter)
    assert max_diff(run_slot(net, ids, 0), expected) <= FP32_ATOL
