"""Checkpoint loading refuses what it cannot load safely or faithfully, with a message that helps.

Every bad checkpoint is a real directory on disk, written by ``save_model`` and then edited the
way a wrong download, a wrong model or a hostile upload would leave it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from flora.model import CheckpointError, load_model, resolve_model_dir, save_model
from flora.model.checkpoint import weight_files
from tests.model.conftest import CONFIGS, FP32_ATOL, hf_model, max_diff, random_ids, random_model

ARGS = CONFIGS["mqa"]
SINGLE = "model.safetensors"


@pytest.fixture
def checkpoint(gen, tmp_path) -> Path:
    return save_model(random_model(ARGS, gen), tmp_path / "ckpt")


def rewrite(directory: Path, edit) -> None:
    """Apply ``edit(state)`` to the single-file checkpoint's tensors, in place."""
    state = load_file(directory / SINGLE)
    edit(state)
    save_file(state, directory / SINGLE, metadata={"format": "pt"})


def edit_config(directory: Path, **changes) -> None:
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))


def test_refuses_pickle_only_checkpoint_without_reading_it(checkpoint):
    (checkpoint / SINGLE).unlink()
    # Not a pickle at all: torch.load would fail with an UnpicklingError, not a CheckpointError.
    (checkpoint / "pytorch_model.bin").write_bytes(b"\x80\x04garbage, never unpickle me")
    with pytest.raises(CheckpointError, match="refusing to unpickle") as err:
        load_model(checkpoint)
    assert "pytorch_model.bin" in str(err.value)
    assert "safetensors" in str(err.value)


def test_refuses_directory_without_weights(checkpoint):
    (checkpoint / SINGLE).unlink()
    with pytest.raises(CheckpointError, match=r"no model\.safetensors"):
        load_model(checkpoint)


def test_missing_tensor_is_named(checkpoint):
    rewrite(checkpoint, lambda s: s.pop("transformer.h.1.mlp.c_fc.bias"))
    with pytest.raises(CheckpointError, match="lacks 1 tensors") as err:
        load_model(checkpoint)
    assert "transformer.h.1.mlp.c_fc.bias" in str(err.value)


def test_unexpected_tensor_is_named(checkpoint):
    rewrite(checkpoint, lambda s: s.update({"transformer.h.0.attn.q_proj.weight": torch.ones(2)}))
    with pytest.raises(CheckpointError, match="unexpected tensor") as err:
        load_model(checkpoint)
    assert "transformer.h.0.attn.q_proj.weight" in str(err.value)


def test_wrong_shape_names_tensor_and_both_shapes(checkpoint):
    edit_config(checkpoint, n_inner=96)  # the weights were written for an MLP of 128
    with pytest.raises(CheckpointError) as err:
        load_model(checkpoint)
    message = str(err.value)
    assert "mlp.c_fc" in message
    assert "[128, 64]" in message or "[128]" in message
    assert "[96, 64]" in message or "[96]" in message


def test_missing_config(checkpoint):
    (checkpoint / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json"):
        load_model(checkpoint)


@pytest.mark.parametrize(
    "change, words",
    [
        ({"model_type": "llama"}, ["gpt_bigcode", "llama"]),
        ({"model_type": None}, ["gpt_bigcode", "None"]),
        ({"activation_function": "relu"}, ["activation_function", "relu"]),
    ],
)
def test_refuses_other_architectures(checkpoint, change, words):
    edit_config(checkpoint, **change)
    with pytest.raises(CheckpointError) as err:
        load_model(checkpoint)
    assert all(w in str(err.value) for w in words)


def test_sharded_checkpoint_with_missing_shard(gen, tmp_path):
    directory = save_model(random_model(ARGS, gen), tmp_path, shard_bytes=30_000)
    shards = [f.name for f in weight_files(directory)]
    assert len(shards) >= 2
    (directory / shards[1]).unlink()
    with pytest.raises(CheckpointError, match="missing") as err:
        load_model(directory)
    assert shards[1] in str(err.value)
    assert shards[0] not in str(err.value)


def test_shard_names_cannot_leave_the_checkpoint_directory(gen, tmp_path):
    directory = save_model(random_model(ARGS, gen), tmp_path / "ckpt", shard_bytes=30_000)
    outside = tmp_path / "outside.safetensors"
    first = weight_files(directory)[0]
    outside.write_bytes(first.read_bytes())  # a real file: only the path check can refuse it
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: f"../{outside.name}" for k in index["weight_map"]}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="outside"):
        load_model(directory)


def test_sharded_checkpoint_equals_single_file(gen, tmp_path):
    net = random_model(ARGS, gen)
    single = load_model(save_model(net, tmp_path / "single"))
    sharded = load_model(save_model(net, tmp_path / "sharded", shard_bytes=10_000))
    ids = random_ids(gen, ARGS.vocab_size, 2, 9)
    assert torch.equal(single(ids), sharded(ids))
    assert torch.equal(single(ids), net(ids))


# --- resolving a model id without network ----------------------------------------------------


@pytest.fixture
def hf_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "hf-home"
    home.mkdir()
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.chdir(tmp_path)  # so a relative "org/name" is not a local directory by chance
    return home


def test_unknown_model_id_says_how_to_get_weights(hf_home):
    with pytest.raises(CheckpointError) as err:
        resolve_model_dir("bigcode/starcoderbase-1b")
    message = str(err.value)
    assert "huggingface-cli download bigcode/starcoderbase-1b" in message
    assert "flora make-tiny-model" in message
    assert str(hf_home / "hub") in message


def test_model_id_resolves_to_hf_cache_snapshot(hf_home, gen):
    net = random_model(ARGS, gen)
    snapshot = hf_home / "hub" / "models--org--name" / "snapshots" / "0123abcd"
    save_model(net, snapshot)
    assert resolve_model_dir("org/name") == snapshot
    ids = random_ids(gen, ARGS.vocab_size, 1, 12)
    assert torch.equal(load_model("org/name")(ids), net(ids))
    with pytest.raises(CheckpointError):
        resolve_model_dir("org/other-name")


def test_hf_hub_cache_overrides_hf_home(hf_home, gen, tmp_path, monkeypatch):
    hub = tmp_path / "elsewhere"
    snapshot = hub / "models--org--name" / "snapshots" / "feed"
    save_model(random_model(ARGS, gen), snapshot)
    with pytest.raises(CheckpointError):
        resolve_model_dir("org/name")  # not under $HF_HOME/hub
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    assert resolve_model_dir("org/name") == snapshot


def test_local_directory_wins(checkpoint):
    assert resolve_model_dir(checkpoint) == checkpoint
    assert resolve_model_dir(str(checkpoint)) == checkpoint


# --- what HF checkpoints may carry besides our parameters -------------------------------------


def test_loads_checkpoint_with_tied_lm_head_and_attention_buffers(checkpoint, gen):
    def add_hf_extras(state):
        state["lm_head.weight"] = state["transformer.wte.weight"].clone()
        for i in range(ARGS.n_layer):  # buffers older GPTBigCode checkpoints carry
            state[f"transformer.h.{i}.attn.bias"] = torch.ones(4, 4, dtype=torch.bool).tril()
            state[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)

    rewrite(checkpoint, add_hf_extras)
    ours, hf = load_model(checkpoint), hf_model(checkpoint)
    ids = random_ids(gen, ARGS.vocab_size, 2, 11)
    assert max_diff(ours(ids), hf(ids).logits) <= FP32_ATOL


@pytest.mark.parametrize("tie", [True, False])
def test_refuses_untied_lm_head(checkpoint, tie):
    """HF uses a distinct ``lm_head.weight`` as is (even when the config says tie): dropping it
    would silently give other logits than the checkpoint's, so our tied model must refuse."""

    def untie(state):
        state["lm_head.weight"] = state["transformer.wte.weight"] + 0.5

    rewrite(checkpoint, untie)
    edit_config(checkpoint, tie_word_embeddings=tie)
    with pytest.raises(CheckpointError, match="lm_head"):
        load_model(checkpoint)


def test_loads_half_precision_checkpoint_as_requested_dtype(checkpoint, gen):
    rewrite(checkpoint, lambda s: s.update({k: v.half() for k, v in s.items()}))
    net = load_model(checkpoint, dtype=torch.float32)
    assert net.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in net.parameters())
    assert not any(p.requires_grad for p in net.parameters())
    ids = random_ids(gen, ARGS.vocab_size, 1, 7)
    assert max_diff(net(ids), hf_model(checkpoint)(ids).logits) <= FP32_ATOL
