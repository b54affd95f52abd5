"""Bad and hostile adapter directories are refused with ``AdapterFileError`` and a clear message.

Each case starts from a valid LoRA directory written by ``save_adapter_dir`` and breaks one
thing, the way a truncated upload, a wrong export or a deliberately malicious file would.
Nothing here may be unpickled, and nothing invalid may reach a bank.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from flora.adapters import AdapterKind
from flora.model import AdapterFileError, load_adapter_dir, load_model, save_adapter_dir
from tests.model.test_adapter_files import ARGS, BANK, C_ATTN, PREFIX, QKV, E, random_layers


@pytest.fixture
def lora_dir(gen, tmp_path) -> Path:
    return save_adapter_dir(
        tmp_path / "lora", AdapterKind.LORA, random_layers(AdapterKind.LORA, gen)
    )


def edit_tensors(directory: Path, edit) -> None:
    file = directory / "adapter_model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file)


def edit_config(directory: Path, **changes) -> None:
    file = directory / "adapter_config.json"
    file.write_text(json.dumps(json.loads(file.read_text()) | changes))


KEY_A = PREFIX + C_ATTN[0] + ".lora_A.weight"
KEY_B = PREFIX + C_ATTN[0] + ".lora_B.weight"


def test_refuses_pickled_weights_without_reading_them(lora_dir):
    (lora_dir / "adapter_model.safetensors").unlink()
    (lora_dir / "adapter_model.bin").write_bytes(b"\x80\x04garbage that is not even a pickle")
    with pytest.raises(AdapterFileError, match="never unpickled") as err:
        load_adapter_dir(lora_dir, ARGS)
    assert "adapter_model.bin" in str(err.value)


@pytest.mark.parametrize(
    "payload",
    [
        b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}",  # header is not JSON
        b"\xff\xff\xff\xff\xff\xff\xff\x7f{}",  # header length far past the file
        b"\x02",  # shorter than the length prefix
    ],
)
def test_corrupt_safetensors(lora_dir, payload):
    (lora_dir / "adapter_model.safetensors").write_bytes(payload)
    with pytest.raises(AdapterFileError, match="not a valid safetensors file"):
        load_adapter_dir(lora_dir, ARGS)


def test_truncated_safetensors(lora_dir):
    file = lora_dir / "adapter_model.safetensors"
    file.write_bytes(file.read_bytes()[:-100])
    with pytest.raises(AdapterFileError, match="not a valid safetensors file"):
        load_adapter_dir(lora_dir, ARGS)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_values(lora_dir, value):
    def poison(t):
        t[KEY_B][3, 1] = value

    edit_tensors(lora_dir, poison)
    with pytest.raises(AdapterFileError, match="NaN or infinite") as err:
        load_adapter_dir(lora_dir, ARGS)
    assert C_ATTN[0] in str(err.value)


@pytest.mark.parametrize(
    "key, shape, words",
    [
        (KEY_A, (4, E - 1), ["(4, 64)", "(4, 63)"]),
        (KEY_B, (QKV - 32, 4), ["(96, 4)", "(64, 4)"]),
        (KEY_A, (4, E, 1), ["(4, 64)", "(4, 64, 1)"]),
    ],
)
def test_wrong_shapes(lora_dir, key, shape, words):
    edit_tensors(lora_dir, lambda t: t.update({key: torch.ones(shape)}))
    with pytest.raises(AdapterFileError) as err:
        load_adapter_dir(lora_dir, ARGS)
    assert C_ATTN[0] in str(err.value)
    assert all(w in str(err.value) for w in words), str(err.value)


def test_rank_mismatch_between_a_and_b(lora_dir):
    edit_tensors(lora_dir, lambda t: t.update({KEY_B: torch.ones(QKV, 3)}))
    with pytest.raises(AdapterFileError, match=r"lora_B.weight \(96, 4\) \(r=4 in"):
        load_adapter_dir(lora_dir, ARGS)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.uint8])
def test_non_float_dtype(lora_dir, dtype):
    edit_tensors(lora_dir, lambda t: t.update({KEY_A: t[KEY_A].to(dtype)}))
    with pytest.raises(AdapterFileError, match="expected a float type") as err:
        load_adapter_dir(lora_dir, ARGS)
    assert KEY_A in str(err.value)


def test_half_precision_file_loads_as_requested_dtype(lora_dir):
    edit_tensors(lora_dir, lambda t: t.update({k: v.half() for k, v in t.items()}))
    adapter = load_adapter_dir(lora_dir, ARGS, dtype=torch.float32)
    assert all(w.A.dtype == w.B.dtype == torch.float32 for w in adapter.layers.values())


def test_over_max_bytes(lora_dir):
    size = (lora_dir / "adapter_model.safetensors").stat().st_size
    load_adapter_dir(lora_dir, ARGS, max_bytes=size)  # exactly at the limit: fine
    with pytest.raises(AdapterFileError, match="over the limit") as err:
        load_adapter_dir(lora_dir, ARGS, max_bytes=size - 1)
    assert str(size) in str(err.value)


@pytest.mark.parametrize(
    "key",
    [
        PREFIX + C_ATTN[0] + ".lora_C.weight",
        PREFIX + C_ATTN[0] + ".lora_B.bias",  # PEFT's lora_bias=True
        PREFIX + "lm_head.weight",
        PREFIX + "transformer.h.0.attn.q_attn.lora_A.weight",
        C_ATTN[0] + ".lora_A.weight",  # without PEFT's prefix
        PREFIX + "transformer.h.-1.attn.c_attn.lora_A.weight",
    ],
)
def test_unknown_tensor_names(lora_dir, key):
    edit_tensors(lora_dir, lambda t: t.update({key: torch.ones(4, E)}))
    with pytest.raises(AdapterFileError, match="unexpected tensor") as err:
        load_adapter_dir(lora_dir, ARGS)
    assert key in str(err.value)


@pytest.mark.parametrize("param", ["flora_A.weight", "ia3_l"])
def test_tensors_of_another_kind(lora_dir, param):
    """A LoRA file that also carries FLoRA or IA3 weights: refused, never silently dropped."""
    key = PREFIX + C_ATTN[0] + "." + param
    edit_tensors(lora_dir, lambda t: t.update({key: torch.ones(4, E)}))
    with pytest.raises(AdapterFileError) as err:
        load_adapter_dir(lora_dir, ARGS)
    assert param in str(err.value)


def test_layer_beyond_the_model(lora_dir):
    key = PREFIX + f"transformer.h.{ARGS.n_layer}.attn.c_attn.lora_A.weight"
    edit_tensors(lora_dir, lambda t: t.update({key: torch.ones(4, E)}))
    with pytest.raises(AdapterFileError, match=f"only {ARGS.n_layer} layers"):
        load_adapter_dir(lora_dir, ARGS)


def test_missing_half_of_a_pair(lora_dir):
    edit_tensors(lora_dir, lambda t: t.pop(KEY_B))
    with pytest.raises(AdapterFileError, match=r"lora_B\.weight is missing"):
        load_adapter_dir(lora_dir, ARGS)


def test_no_tensors(lora_dir):
    save_file({}, lora_dir / "adapter_model.safetensors")
    with pytest.raises(AdapterFileError, match="holds no"):
        load_adapter_dir(lora_dir, ARGS)


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"peft_type": "PREFIX_TUNING"}, ["PREFIX_TUNING", "LORA"]),
        ({"peft_type": None}, ["peft_type"]),
        ({"use_dora": True}, ["DoRA"]),
        ({"bias": "all"}, ["bias", "all"]),
        ({"bias": "lora_only"}, ["bias", "lora_only"]),
        ({"modules_to_save": ["lm_head"]}, ["modules_to_save"]),
        ({"fan_in_fan_out": True}, ["fan_in_fan_out"]),
        ({"lora_alpha": "eight"}, ["lora_alpha"]),
        ({"alpha_pattern": {"c_attn": "x"}}, ["alpha_pattern"]),
        ({"alpha_pattern": {"h.0.(": 4}}, ["alpha_pattern"]),
    ],
)
def test_unsupported_or_invalid_config(lora_dir, changes, words):
    edit_config(lora_dir, **changes)
    with pytest.raises(AdapterFileError) as err:
        load_adapter_dir(lora_dir, ARGS)
    assert all(w in str(err.value) for w in words), str(err.value)


@pytest.mark.parametrize(
    "text, words", [("{not json", "not valid JSON"), ("[1, 2]", "JSON object"), ("\xff", "JSON")]
)
def test_config_not_a_json_object(lora_dir, text, words):
    (lora_dir / "adapter_config.json").write_text(text, encoding="latin-1")
    with pytest.raises(AdapterFileError, match=words):
        load_adapter_dir(lora_dir, ARGS)


def test_missing_config(lora_dir):
    (lora_dir / "adapter_config.json").unlink()
    with pytest.raises(AdapterFileError, match=r"adapter_config\.json not found"):
        load_adapter_dir(lora_dir, ARGS)


def test_adapter_for_a_module_the_model_does_not_adapt(gen, base_dir, tmp_path):
    layers = random_layers(AdapterKind.IA3, gen)  # c_attn and mlp.c_fc
    adapter = load_adapter_dir(save_adapter_dir(tmp_path / "ia3", AdapterKind.IA3, layers), ARGS)
    net = load_model(base_dir)
    net.enable_adapters(("c_attn",), BANK)
    with pytest.raises(ValueError, match=r"mlp\.c_fc") as err:
        net.load_adapter(0, adapter.layers)
    assert "targets enabled" in str(err.value)
