"""Finite is not enough: adapters whose values would overflow the serving dtype are refused at
upload and at load, with the same message; adapters trained by PEFT and by ``flora train`` pass
with a wide margin under the default limit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save
from safetensors.torch import load_file

from adapter_format import (
    DEFAULT_MAX_MAGNITUDE,
    TENSOR_KEY,
    AdapterConfig,
    AdapterKind,
    ServingLimits,
    effect_bound,
)
from adapter_registry import BaseModelCatalog, BaseModelSpec
from adapter_registry.errors import InvalidAdapter
from adapter_registry.formats import validate_adapter
from flora.model import AdapterFileError, load_adapter_dir, load_model
from flora.train import make_tiny_model
from flora.train.training_run import train_adapters
from tests.adapter_format.conftest import ARGS, adapter_dir
from tests.adapter_registry.conftest import PREFIX, SPEC, adapter_config, adapter_tensors
from tests.train.test_adapter_training import _config, _data

C_ATTN = f"{PREFIX}.0.attn.c_attn"


def both_refuse(config: dict | bytes, weights: dict, tmp_path: Path, match: str, **limits) -> str:
    """The registry's 422 and the engine's refusal, with one message; returns it."""
    spec = SPEC.model_copy(update={"limits": ServingLimits(**limits)})
    config_bytes = config if isinstance(config, bytes) else json.dumps(config).encode()
    with pytest.raises(InvalidAdapter, match=match) as upload:
        validate_adapter(config_bytes, save(weights), BaseModelCatalog([spec]), max_bytes=1 << 24)
    assert upload.value.status == 422
    with pytest.raises(AdapterFileError) as load:
        load_adapter_dir(adapter_dir(tmp_path, config, weights), ARGS, limits=spec.limits)
    assert str(load.value) == upload.value.message.replace(SPEC.name, "this model")
    return upload.value.message


def scaled(kind: str, rank: int, a: float = 1.0, b: float = 1.0) -> dict[str, np.ndarray]:
    tensors = adapter_tensors(kind, rank)
    for name in tensors:
        tensors[name] = tensors[name] * (a if "_A." in name or "ia3" in name else b)
    return {k: v.astype(np.float32) for k, v in tensors.items()}


def test_huge_lora_weights_are_refused(tmp_path):
    message = both_refuse(
        adapter_config("lora", 2), scaled("lora", 2, b=1e37), tmp_path, "stored factor"
    )
    assert "over this server's limit of 1000" in message and "max_adapter_magnitude" in message


@pytest.mark.parametrize(
    "field, value",
    [("lora_alpha", 1e308), ("lora_alpha", -1e7), ("alpha_pattern", {"c_attn": 1e308})],
)
def test_huge_alpha_is_refused_in_the_config(field, value, tmp_path):
    both_refuse(
        adapter_config("lora", 2, **{field: value}),
        adapter_tensors("lora", 2),
        tmp_path,
        r"must be a finite number within ±1e\+06",
    )


def test_a_large_alpha_within_the_config_bound_is_refused_by_its_effect(tmp_path):
    both_refuse(
        adapter_config("lora", 2, lora_alpha=5e5), adapter_tensors("lora", 2), tmp_path, r"\|scale"
    )


@pytest.mark.parametrize(
    "a, b, what",
    [(100.0, 100.0, "the factor B A / r"), (1e4, 1e-4, "stored factor")],
)
def test_flora_factors_out_of_range_are_refused(a, b, what, tmp_path):
    """A large product, or a huge side balanced by a tiny one (the intermediate overflows)."""
    both_refuse(adapter_config("flora", 2), scaled("flora", 2, a, b), tmp_path, what)


def test_ia3_scale_out_of_range_is_refused(tmp_path):
    both_refuse(adapter_config("ia3", 1), scaled("ia3", 1, a=1e4), tmp_path, "stored factor")


def test_the_limit_is_the_servers(tmp_path):
    """An engine that raises max_adapter_magnitude lets the registry accept more."""
    config, weights = adapter_config("flora", 2), scaled("flora", 2, 100.0, 100.0)
    spec = SPEC.model_copy(update={"limits": ServingLimits(max_magnitude=1e6)})
    validate_adapter(
        json.dumps(config).encode(), save(weights), BaseModelCatalog([spec]), max_bytes=1 << 24
    )
    load_adapter_dir(adapter_dir(tmp_path, config, weights), ARGS, limits=spec.limits)


@pytest.mark.parametrize("kind", ["lora", "flora"])
def test_the_bound_holds_for_the_exact_product(kind):
    """``effect_bound`` is never below ``max |scale · B A|`` (or ``|B A / r|``)."""
    rng = np.random.default_rng(0)
    for rank in (1, 2, 5, 16):
        a = rng.standard_normal((rank, 40)) * rng.uniform(0.01, 10)
        b = rng.standard_normal((30, rank)) * rng.uniform(0.01, 10)
        scale = 3.0 if kind == "lora" else 1 / rank
        exact = np.abs(scale * (b @ a)).max()
        bound = effect_bound(
            AdapterKind(kind), np.abs(a).max(1).tolist(), np.abs(b).max(0).tolist(), 3.0
        )
        assert exact <= bound * (1 + 1e-12)
        if rank == 1:  # one term: the bound is the product's largest entry exactly
            assert bound == pytest.approx(exact)


# --- trained adapters pass with a wide margin ------------------------------------------------


def largest_effect(directory: Path) -> float:
    """The largest stored factor or effect bound over the adapter's modules (what the limit
    caps), computed from the files with the format's own formula."""
    config = AdapterConfig.parse((directory / "adapter_config.json").read_bytes())
    tensors = load_file(str(directory / "adapter_model.safetensors"))
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        match = TENSOR_KEY.fullmatch(name)
        side = "B" if match["param"].endswith("_B.weight") else "A"  # ia3_l: "A"
        modules.setdefault(match["module"], {})[side] = t
    worst = 0.0
    for module, factors in modules.items():
        a = factors["A"].double().abs()
        if config.kind is AdapterKind.IA3:
            worst = max(worst, float(a.max()))
            continue
        a_rows, b_cols = a.amax(1).tolist(), factors["B"].double().abs().amax(0).tolist()
        rank = len(a_rows)
        scale = config.lora_scale(module, rank) if config.kind is AdapterKind.LORA else 1.0
        worst = max(worst, *a_rows, *b_cols, effect_bound(config.kind, a_rows, b_cols, scale))
    return worst


@pytest.fixture(scope="module")
def micro_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("models") / "micro"
    return make_tiny_model(out, preset="micro", languages=["python"], progress=False)


def test_peft_trained_lora_passes_with_margin(micro_model, tmp_path):
    """LoRA trained by PEFT itself (AdamW, 60 steps at 10× a usual learning rate)."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPTBigCodeForCausalLM

    torch.manual_seed(0)
    hf = GPTBigCodeForCausalLM.from_pretrained(micro_model)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"])
    model = get_peft_model(hf, config)
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    ids = torch.randint(0, hf.config.vocab_size, (4, 32))
    for _ in range(60):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimiser.step()
        optimiser.zero_grad()
    model.save_pretrained(tmp_path / "peft")
    directory = tmp_path / "peft"
    worst = largest_effect(directory)
    print(f"largest factor or effect: {worst:.3g}")
    assert 0 < worst <= DEFAULT_MAX_MAGNITUDE / 100, worst
    spec = BaseModelSpec.from_hf_config(
        "micro", json.loads((micro_model / "config.json").read_text())
    )
    info = validate_adapter(
        (directory / "adapter_config.json").read_bytes(),
        (directory / "adapter_model.safetensors").read_bytes(),
        BaseModelCatalog([spec]),
        base_model="micro",
        max_bytes=1 << 24,
    )
    assert info.kind is AdapterKind.LORA and info.rank == 8
    load_adapter_dir(directory, load_model(micro_model).args)


@pytest.mark.parametrize("kind", [AdapterKind.FLORA, AdapterKind.LORA, AdapterKind.IA3])
def test_flora_trained_adapters_pass_with_margin(micro_model, kind, tmp_path):
    """``flora train``'s own trainer, at the paper's learning rates."""
    config = _config(kind, steps=20, lr=None)
    result = train_adapters(
        load_model(micro_model), config, _data(micro_model, ("perl",)), tmp_path, progress=False
    )
    worst = largest_effect(result.adapters["perl"])
    print(f"largest factor or effect: {worst:.3g}")
    assert 0 < worst <= DEFAULT_MAX_MAGNITUDE / 100, worst
    load_adapter_dir(result.adapters["perl"], load_model(micro_model).args)
