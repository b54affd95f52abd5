"""``flora convert``: a PEFT LoRA directory in, a FLoRA adapter directory out.

Reads the LoRA, checks it against the base model, fits rank-R FLoRA factors per layer
(:mod:`flora.train.conversion`), writes them with :func:`save_adapter_dir` and prints the
relative weight error per layer, so the user sees how much of the LoRA survived.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from flora.train.datasets import LanguageData

DEFAULT_SEQ_LEN = 128
DEFAULT_LANGUAGE = "python"


def add_parser(commands: argparse._SubParsersAction) -> None:
    c = commands.add_parser(
        "convert",
        help="convert a PEFT LoRA adapter to a FLoRA adapter (weighted low-rank fit)",
        description="Fit rank-R FLoRA factors so that W0 ∘ (B A / r) matches each LoRA layer's "
        "W0 + scale·B_l A_l (alternating least squares), optionally weighting input features by "
        "their mean square on calibration text. Writes a FLoRA adapter directory and prints the "
        "per-layer relative weight error (1.0 = no better than the base model).",
    )
    c.add_argument("lora_dir", metavar="LORA_DIR", help="PEFT LoRA adapter directory")
    c.add_argument("out_dir", metavar="OUT_DIR", help="where to write the FLoRA adapter")
    c.add_argument("--model", required=True, help="base model directory (or cached model id)")
    c.add_argument("--rank", type=int, required=True, help="FLoRA rank R")
    c.add_argument(
        "--calibration-windows",
        type=int,
        default=0,
        help="token windows of local code to weight inputs by (default 0: plain weight fit)",
    )
    c.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN, help="calibration window")
    c.add_argument("--language", default=DEFAULT_LANGUAGE, help="calibration corpus language")
    c.add_argument(
        "--data",
        help="calibration text: a folder of source files or a JSONL of {text, language} "
        "(default: source files found on this machine, as flora train)",
    )
    c.add_argument("--iters", type=int, default=100, help="ALS rounds at most (default 100)")
    c.add_argument(
        "--distill-steps",
        type=int,
        default=0,
        help="then distil toward the LoRA's logits on the calibration windows (default 0: off)",
    )
    c.add_argument("--seed", type=int, default=0)
    c.set_defaults(handler=run)


def corpus(model_dir: str | Path, language: str, source: str | Path | None = None) -> LanguageData:
    """``language`` text tokenized with the model's tokenizer, split by file exactly as
    ``flora train`` and ``flora eval`` split it by default (source, held-out fraction, data
    seed), so its held-out side is text the LoRA never trained on."""
    from flora.model.tokenizer import Tokenizer
    from flora.train.datasets import load_language_data

    return load_language_data(Tokenizer.from_dir(model_dir), source, [language])[language]


def corpus_windows(
    data: LanguageData, n: int, seq_len: int, *, held_out: bool = False, seed: int = 0
) -> torch.Tensor:
    """``[n, seq_len + 1]`` windows: sampled (``seed``) from the training side, for
    calibration, or spread evenly over the held-out side (at most ``n``), for scoring."""
    import torch

    from flora.model.tiny.build import random_windows
    from flora.train.datasets import heldout_windows

    if held_out:
        return heldout_windows(data.held_out, seq_len, n)
    return random_windows(data.train, n, seq_len, torch.Generator().manual_seed(seed))


def _error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    from flora.adapters import AdapterKind, InvalidAdapterError, LoraWeights
    from flora.model import AdapterFileError, CheckpointError, load_adapter_dir, save_adapter_dir
    from flora.model.adapter_files import read_config
    from flora.model.checkpoint import load_model, resolve_model_dir
    from flora.train import conversion

    if args.rank < 1:
        return _error(f"--rank must be at least 1, got {args.rank}")
    if args.distill_steps > 0 and args.calibration_windows < 1:
        return _error("--distill-steps needs --calibration-windows (the text to distil on)")
    try:
        model_dir = resolve_model_dir(args.model)
        model = load_model(model_dir)
        config = read_config(args.lora_dir)
    except (AdapterFileError, CheckpointError) as e:
        return _error(str(e))
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        return _error(
            f"{args.lora_dir} holds an adapter of peft_type {peft_type or None!r}; "
            "`flora convert` takes a LoRA adapter (peft_type 'LORA')"
        )
    try:
        lora = load_adapter_dir(args.lora_dir, model.args)
    except AdapterFileError as e:
        return _error(f"{e} (is LORA_DIR an adapter for the base model {model_dir}?)")
    layers = {p: w for p, w in lora.layers.items() if isinstance(w, LoraWeights)}
    calibration, windows = None, None
    if args.calibration_windows > 0:
        seq_len = min(args.seq_len, model.args.n_positions)
        try:
            data = corpus(model_dir, args.language, args.data)
            windows = corpus_windows(data, args.calibration_windows, seq_len, seed=args.seed)
        except (ValueError, OSError) as e:
            return _error(f"calibration text: {e}")
        calibration = conversion.collect_calibration(model, windows[:, :-1])
    try:
        flora = conversion.convert_lora(
            model, layers, args.rank, calibration=calibration, iters=args.iters, seed=args.seed
        )
    except (ValueError, InvalidAdapterError) as e:
        return _error(str(e))
    if args.distill_steps > 0:
        assert windows is not None
        flora = conversion.distill(
            model, layers, flora, windows[:, :-1], steps=args.distill_steps, seed=args.seed
        )
    weighting = "activation" if calibration is not None else "plain"
    extra = {
        "converted_from": {
            "peft_type": "LORA",
            "r": lora.rank,
            "sha256": lora.sha256,
            "method": "weighted ALS",
            "weighting": weighting,
            "calibration_windows": args.calibration_windows,
            "distill_steps": args.distill_steps,
        }
    }
    base = str(config.get("base_model_name_or_path") or model_dir)
    save_adapter_dir(args.out_dir, AdapterKind.FLORA, flora, base_model=base, extra_config=extra)
    print(f"LoRA r{lora.rank} → FLoRA r{args.rank} ({weighting} weighting), {len(flora)} layers")
    weighted = calibration is not None
    head = f"{'layer':<32} {'rel. weight error':>18}" + (
        f" {'activation-weighted':>20}" if weighted else ""
    )
    print(head)
    errors = []
    for path, fit in flora.items():
        W0 = conversion.base_weight(model, path)
        target = conversion.lora_target(W0, layers[path])
        err = conversion.relative_weight_error(W0, target, fit)
        errors.append(err)
        line = f"{path:<32} {err:>18.4f}"
        if calibration is not None:
            s = calibration[path].to(W0.device)[None, :]
            line += f" {conversion.relative_weight_error(W0, target, fit, weights=s):>20.4f}"
        print(line)
    print(f"{'mean':<32} {sum(errors) / len(errors):>18.4f}")
    print(f"wrote {args.out_dir}")
    return 0
