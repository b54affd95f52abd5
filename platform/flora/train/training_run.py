"""A resumable training run: sample windows, step, score held-out text, checkpoint, write adapters.

Layout of ``out_dir``:

    checkpoint.safetensors    tables, Adam moments, sampler states; the run's config and step in
                              its metadata (one file, replaced atomically, never pickled)
    train_log.jsonl           one line per evaluation: step, train and held-out loss per adapter
    <name>/                   one PEFT-style adapter directory per adapter, written at the end
        adapter_config.json, adapter_model.safetensors, training.json

Starting again with the same arguments resumes from the checkpoint; the windows each adapter
sees come from its own seeded sampler, so a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from flora.model.adapter_files import save_adapter_dir
from flora.model.model import GPTBigCode
from flora.model.tiny.build import random_windows
from flora.train.adapter_training import PAPER_LR, AdapterTrainer, TrainConfig, adapter_seed
from flora.train.datasets import LanguageData, heldout_windows
from flora.train.evaluation import Job, mean_losses

CHECKPOINT = "checkpoint.safetensors"
LOG = "train_log.jsonl"
RECORD = "training.json"


class CheckpointMismatch(ValueError):
    """``out_dir`` holds a checkpoint of a different run: resuming it would mix two runs."""


@dataclass(frozen=True)
class TrainResult:
    adapters: dict[str, Path]  # name → adapter directory
    held_out: dict[str, float]  # name → final held-out loss
    base_held_out: dict[str, float]  # name → the base model's loss on the same windows
    steps: int
    seconds: float  # training time of the whole run, earlier sessions included
    resumed_from: int
    tokens_per_second: float


def _samplers(config: TrainConfig, names: tuple[str, ...]) -> dict[str, torch.Generator]:
    return {n: torch.Generator().manual_seed(adapter_seed(config.seed, n) + 1) for n in names}


def _run_identity(config: TrainConfig, data: Mapping[str, LanguageData], base: str) -> str:
    """What makes two runs the same run. The paper's rate given as ``--lr`` or implied (None)
    is one run: the settings are recorded as the rate they resolve to, named only if it differs."""
    files = {n: [len(d.train), len(d.held_out), *d.files] for n, d in data.items()}
    settings = config.model_dump(mode="json")
    settings["lr"] = None if config.learning_rate == PAPER_LR[config.kind] else config.lr
    return json.dumps({"config": settings, "data": files, "base_model": base}, sort_keys=True)


def _save_checkpoint(
    out: Path,
    trainer: AdapterTrainer,
    samplers: dict[str, torch.Generator],
    identity: str,
    seconds: float,
) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in trainer.state().items()}
    tensors |= {f"sampler/{n}": g.get_state() for n, g in samplers.items()}
    meta = {"run": identity, "step": str(trainer.step_count), "seconds": f"{seconds:.3f}"}
    tmp = out / f".{CHECKPOINT}.tmp"
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, out / CHECKPOINT)


def _resume(
    out: Path, trainer: AdapterTrainer, samplers: dict[str, torch.Generator], identity: str
) -> tuple[int, float]:
    """The step a run in ``out`` reached and its training seconds so far ((0, 0.0): none)."""
    file = out / CHECKPOINT
    if not file.is_file():
        return 0, 0.0
    from safetensors import safe_open

    with safe_open(str(file), "pt") as f:
        meta = f.metadata() or {}
    if meta.get("run") != identity:
        raise CheckpointMismatch(
            f"{file} belongs to a run with other settings or data; "
            "use a new output directory (or delete the checkpoint to start over)"
        )
    tensors = load_file(str(file))
    step = int(meta["step"])
    trainer.load_state(tensors, step)
    for name, gen in samplers.items():
        gen.set_state(tensors[f"sampler/{name}"])
    return step, float(meta.get("seconds", 0.0))


def train_adapters(
    model: GPTBigCode,
    config: TrainConfig,
    data: Mapping[str, LanguageData],
    out_dir: str | Path,
    *,
    base_model: str = "",
    eval_every: int = 50,
    eval_windows: int = 16,
    checkpoint_every: int = 50,
    progress: bool = True,
) -> TrainResult:
    """Train one adapter per entry of ``data`` (named by it), all in the same batches."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = tuple(data)
    trainer = AdapterTrainer(model, config, names)
    samplers = _samplers(config, names)
    identity = _run_identity(config, data, base_model)
    start_step, earlier_seconds = _resume(out, trainer, samplers, identity)
    held = {n: heldout_windows(d.held_out, config.seq_len, eval_windows) for n, d in data.items()}
    slots = {n: i for i, n in enumerate(names)}
    base_loss = dict(zip(names, mean_losses(model, [Job(held[n]) for n in names]), strict=True))
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if model.device.type == "cuda"
        else contextlib.nullcontext()
    )

    def evaluate() -> dict[str, float]:
        with autocast:
            losses = mean_losses(model, [Job(held[n], slots[n]) for n in names])
        return dict(zip(names, losses, strict=True))

    bar = tqdm(
        total=config.steps,
        initial=start_step,
        desc=f"training {len(names)} {config.kind} adapter(s)",
        unit="step",
        disable=not progress,
    )
    started, tokens = time.perf_counter(), 0
    smooth: torch.Tensor | None = None
    with (out / LOG).open("a") as log:
        while trainer.step_count < config.steps:
            windows = [
                random_windows(data[n].train, config.batch_size, config.seq_len, samplers[n])
                for n in names
            ]
            with autocast:
                losses = trainer.step(windows)
            tokens += sum(w[:, 1:].numel() for w in windows)
            smooth = losses if smooth is None else 0.9 * smooth + 0.1 * losses
            step = trainer.step_count
            bar.update(1)
            bar.set_postfix_str(f"loss={float(smooth.mean()):.3f}", refresh=False)
            if step % eval_every == 0 or step == config.steps:
                entry = {
                    "step": step,
                    "train_loss": dict(zip(names, smooth.tolist(), strict=True)),
                    "held_out_loss": evaluate(),
                }
                log.write(json.dumps(entry) + "\n")
                log.flush()
            if step % checkpoint_every == 0 or step == config.steps:
                seconds = earlier_seconds + time.perf_counter() - started
                _save_checkpoint(out, trainer, samplers, identity, seconds)
    bar.close()
    ran = time.perf_counter() - started
    seconds = earlier_seconds + ran
    final = evaluate()
    written = {}
    for name, layers in trainer.export().items():
        directory = save_adapter_dir(out / name, config.kind, layers, base_model=base_model)
        record: dict[str, Any] = {
            "adapter": name,
            "config": config.model_dump(mode="json"),
            "learning_rate": config.learning_rate,
            "train_files": data[name].files[0],
            "held_out_files": data[name].files[1],
            "held_out_loss": round(final[name], 5),
            "base_held_out_loss": round(base_loss[name], 5),
            "steps": config.steps,
            "train_seconds": round(seconds, 1),
        }
        (directory / RECORD).write_text(json.dumps(record, indent=2) + "\n")
        written[name] = directory
    return TrainResult(
        adapters=written,
        held_out=final,
        base_held_out=base_loss,
        steps=config.steps,
        seconds=seconds,
        resumed_from=start_step,
        tokens_per_second=tokens / ran if tokens else 0.0,
    )
