"""Same inputs, same verdicts: the registry's whole bad-input corpus (tests/adapter_registry/
test_formats.py) is refused by the engine's loader too, with the same message wherever the
check is the shared format's; and the engine's serving limits refuse at upload what they
refuse at load (finding 3 of issue 14: rank 32 on a max_rank-16 engine, non-numeric alphas)."""

from __future__ import annotations

import json

import pytest
from safetensors.numpy import save

from adapter_format import AdapterKind, ServingLimits
from adapter_registry import BaseModelCatalog
from adapter_registry.errors import InvalidAdapter
from adapter_registry.formats import validate_adapter
from flora.model import AdapterFileError, load_adapter_dir
from tests.adapter_format.conftest import ARGS, adapter_dir
from tests.adapter_registry.conftest import SPEC, adapter_config, adapter_tensors
from tests.adapter_registry.test_formats import CONFIG_CASES

# the registry alone knows base-model names and its upload size limit
REGISTRY_ONLY = {
    "weights over the limit",
    "unknown base model",
    "unknown base model override",
    "missing base model",
}
SHARED = {k: v for k, v in CONFIG_CASES.items() if k not in REGISTRY_ONLY}


@pytest.mark.parametrize("case", list(SHARED))
def test_the_engine_refuses_what_the_registry_refuses(case, tmp_path):
    error, _, _, config, weights, kwargs = SHARED[case]
    config_bytes = config if isinstance(config, bytes) else json.dumps(config).encode()
    weight_bytes = weights if isinstance(weights, bytes) else save(weights)
    with pytest.raises(error) as upload:
        validate_adapter(
            config_bytes, weight_bytes, BaseModelCatalog([SPEC]), max_bytes=1 << 20, **kwargs
        )
    with pytest.raises(AdapterFileError) as load:
        load_adapter_dir(adapter_dir(tmp_path, config_bytes, weight_bytes), ARGS)
    registry_says = upload.value.message.replace(SPEC.name, "this model")
    if error is InvalidAdapter:
        assert str(load.value) == registry_says


LIMITS = ServingLimits(
    max_rank=16, kinds=frozenset({AdapterKind.FLORA, AdapterKind.LORA}), targets=("c_attn",)
)
MODULE = "base_model.model.transformer.h"


@pytest.mark.parametrize(
    "config, weights, match",
    [
        (adapter_config("lora", 32), adapter_tensors("lora", 32), "max_rank 16"),
        (adapter_config("ia3", 1), adapter_tensors("ia3", 1), "ia3 adapters are not served"),
        (
            adapter_config("flora", 2, target_modules=["c_fc"]),
            adapter_tensors("flora", 2, modules=("mlp.c_fc",)),
            r"targets \['mlp.c_fc'\]",
        ),
        (
            adapter_config("lora", 2, alpha_pattern={"c_attn": "abc"}),
            adapter_tensors("lora", 2),
            "alpha_pattern.*must be a finite number",
        ),
        (
            adapter_config("lora", 2, rank_pattern={"c_attn": 2.5}),
            adapter_tensors("lora", 2),
            "rank_pattern.*must be an integer",
        ),
        (
            adapter_config("lora", 2, use_rslora="yes"),
            adapter_tensors("lora", 2),
            "use_rslora must be true or false",
        ),
    ],
    ids=[
        "rank over max_rank",
        "kind not served",
        "target not adapted",
        "alpha text",
        "rank fraction",
        "rslora text",
    ],
)
def test_serving_limits_refuse_at_upload_what_the_engine_refuses(config, weights, match, tmp_path):
    spec = SPEC.model_copy(update={"limits": LIMITS})
    with pytest.raises(InvalidAdapter, match=match) as upload:
        validate_adapter(
            json.dumps(config).encode(), save(weights), BaseModelCatalog([spec]), max_bytes=1 << 24
        )
    with pytest.raises(AdapterFileError) as load:
        load_adapter_dir(adapter_dir(tmp_path, config, weights), ARGS, limits=LIMITS)
    assert str(load.value) == upload.value.message.replace(SPEC.name, "this model")


def test_what_the_limits_allow_loads(tmp_path):
    config, weights = adapter_config("lora", 16), adapter_tensors("lora", 16)
    spec = SPEC.model_copy(update={"limits": LIMITS})
    info = validate_adapter(
        json.dumps(config).encode(), save(weights), BaseModelCatalog([spec]), max_bytes=1 << 24
    )
    loaded = load_adapter_dir(adapter_dir(tmp_path, config, weights), ARGS, limits=LIMITS)
    assert info.rank == loaded.rank == 16
