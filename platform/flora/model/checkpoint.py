"""Load and save GPTBigCode checkpoints in HF's layout: ``config.json`` + safetensors.

Only safetensors are read (single file or sharded with ``model.safetensors.index.json``); a
directory holding only pickled ``.bin``/``.pt`` weights is refused, never unpickled. Names and
shapes are checked against the config before any tensor is copied into the model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from flora.model.config import ModelArgs
from flora.model.errors import CheckpointError
from flora.model.model import GPTBigCode

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
# Buffers some older GPTBigCode checkpoints carry; they hold no learned weights.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")


def resolve_model_dir(model: str | Path) -> Path:
    """A local checkpoint directory for ``model``: a path, or a model id in the HF cache.

    Nothing is downloaded: serving machines run offline. The error says where to put weights.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    cached = _hf_cache_snapshot(str(model))
    if cached is not None:
        return cached
    raise CheckpointError(
        f"model {str(model)!r} is neither a local directory nor in the Hugging Face cache "
        f"({_hf_hub_dir()}). Download it where there is network, e.g. "
        f"`huggingface-cli download {model} --local-dir /models/{Path(str(model)).name}`, "
        "and pass that directory; or build a tiny test model with `flora make-tiny-model DIR`."
    )


def _hf_hub_dir() -> Path:
    home = os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface"))
    return Path(os.environ.get("HF_HUB_CACHE", os.path.join(home, "hub")))


def _hf_cache_snapshot(model_id: str) -> Path | None:
    if model_id.count("/") != 1:
        return None
    snapshots = _hf_hub_dir() / f"models--{model_id.replace('/', '--')}" / "snapshots"
    candidates = sorted(snapshots.glob("*/config.json"), key=lambda p: p.stat().st_mtime)
    return candidates[-1].parent if candidates else None


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint, refusing pickle-only checkpoints."""
    if (directory / INDEX).is_file():
        index = json.loads((directory / INDEX).read_text())
        names = sorted(set(index.get("weight_map", {}).values()))
        if not names:
            raise CheckpointError(f"{directory / INDEX} has an empty weight_map")
        escaping = [n for n in names if Path(n).name != n or n in ("", ".", "..")]
        if escaping:
            raise CheckpointError(f"{INDEX} names shards outside {directory}: {escaping[:3]}")
        files = [directory / n for n in names]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"shards listed in {INDEX} are missing: {missing}")
        return files
    if (directory / SINGLE).is_file():
        return [directory / SINGLE]
    pickled = sorted(p.name for p in directory.glob("*") if p.suffix in (".bin", ".pt", ".pth"))
    if pickled:
        raise CheckpointError(
            f"{directory} holds only pickled weights {pickled}; refusing to unpickle. Convert "
            "them to safetensors where you trust the file (e.g. transformers' "
            "`save_pretrained(..., safe_serialization=True)`)."
        )
    raise CheckpointError(f"no {SINGLE} or {INDEX} in {directory}")


def load_model(
    model: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> GPTBigCode:
    """Build a :class:`GPTBigCode` from a checkpoint directory or cached model id."""
    directory = resolve_model_dir(model)
    args = ModelArgs.from_dir(directory)
    with torch.device("meta"):
        net = GPTBigCode(args)
    expected = {n: p.shape for n, p in net.named_parameters()}
    state: dict[str, torch.Tensor] = {}
    lm_head: torch.Tensor | None = None
    for file in weight_files(directory):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if name == "lm_head.weight":
                    lm_head = f.get_tensor(name).to(device=device, dtype=dtype)
                    continue  # checked below: our lm_head is tied to wte
                if name.endswith(_IGNORED_SUFFIXES):
                    continue
                if name not in expected:
                    raise CheckpointError(f"{file.name}: unexpected tensor {name!r}")
                shape = tuple(f.get_slice(name).get_shape())
                if shape != tuple(expected[name]):
                    raise CheckpointError(
                        f"{file.name}: {name} has shape {list(shape)}, the config implies "
                        f"{list(expected[name])}"
                    )
                state[name] = f.get_tensor(name).to(device=device, dtype=dtype)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointError(f"checkpoint {directory} lacks {len(missing)} tensors: {missing[:5]}")
    if lm_head is not None and not torch.equal(lm_head, state["transformer.wte.weight"]):
        # transformers would use it as is; dropping it would silently change the logits.
        raise CheckpointError(
            f"checkpoint {directory} has an lm_head.weight that differs from "
            "transformer.wte.weight; untied output embeddings are not supported"
        )
    net.load_state_dict(state, assign=True)
    return net.eval().requires_grad_(False)


def save_model(net: GPTBigCode, directory: str | Path, *, shard_bytes: int | None = None) -> Path:
    """Write ``config.json`` and safetensors (sharded above ``shard_bytes``) in HF's layout."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(net.args.to_hf_config(), indent=2) + "\n")
    state = {n: t.detach().contiguous().cpu() for n, t in net.base_state_dict().items()}
    meta = {"format": "pt"}
    if shard_bytes is None or sum(t.nbytes for t in state.values()) <= shard_bytes:
        save_file(state, str(out / SINGLE), metadata=meta)
        return out
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        if shards[-1] and size + tensor.nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += tensor.nbytes
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / file), metadata=meta)
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.nbytes for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return out
