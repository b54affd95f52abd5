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

DEFAULT_SEQ_LEN = 128
DEFAULT_LANGUAGE = "python"
MIN_CORPUS_BYTES, MAX_CORPUS_BYTES = 50_000, 2_000_000
BYTES_PER_TOKEN = 4  # generous for a BPE on code: read enough text, but not the whole disk
HELD_OUT_FRACTION = 0.1


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
    c.add_argument("--iters", type=int, default=100, help="ALS rounds at most (default 100)")
    c.add_argument(
        "--distill-steps",
        type=int,
        default=0,
        help="then distil toward the LoRA's logits on the calibration windows (default 0: off)",
    )
    c.add_argument("--seed", type=int, default=0)
    c.set_defaults(handler=run)


def corpus_windows(
    model_dir: str | Path,
    language: str,
    n: int,
    seq_len: int,
    *,
    held_out: bool = False,
    seed: int = 0,
    max_bytes: int | None = None,
) -> torch.Tensor:
    """``n`` random windows ``[n, seq_len + 1]`` of local ``language`` code, tokenized with the
    model's tokenizer; from the training side of a by-file split, or the held-out side.

    Calibration and evaluation draw from disjoint files, so a reported held-out number never
    saw the text the conversion was weighted on. ``max_bytes`` of source are read (default:
    about twice what the windows need, the held-out side being a tenth of the files).
    """
    import torch

    from flora.model.tokenizer import Tokenizer
    from flora.train.corpus import collect, split_holdout
    from flora.train.tiny_model import random_windows, token_stream

    if max_bytes is None:
        side = 1 / HELD_OUT_FRACTION if held_out else 1 / (1 - HELD_OUT_FRACTION)
        need = 2 * BYTES_PER_TOKEN * n * (seq_len + 1) * side
        max_bytes = int(min(max(need, MIN_CORPUS_BYTES), MAX_CORPUS_BYTES))
    tokenizer = Tokenizer.from_dir(model_dir)
    train, held = split_holdout(collect([language], max_bytes, seed), HELD_OUT_FRACTION, seed)
    texts = (held if held_out else train)[language]
    stream = token_stream(tokenizer, texts)
    gen = torch.Generator().manual_seed(seed + (1 if held_out else 0))
    return random_windows(stream, n, seq_len, gen)


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
            windows = corpus_windows(
                model_dir, args.language, args.calibration_windows, seq_len, seed=args.seed
            )
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
