"""How much of a LoRA adapter survives conversion to FLoRA, by rank and weighting.

    .venv/bin/python scripts/conversion_report.py MODEL_DIR LORA_DIR [--ranks 1 2 4 8 16]

For each FLoRA rank and each weighting (plain ‖W0 ∘ M − T‖_F, and activation-weighted by the
mean square of each input feature on calibration code), it fits the conversion
(:mod:`flora.train.conversion`) and measures, against the LoRA model on held-out windows:
the weight-space relative error (mean over layers; 1.0 = no better than the base model), the
mean |Δlogit|, KL(p_LoRA ‖ p_FLoRA) per token, and the held-out loss next to the base model's
and the LoRA model's. Calibration and held-out windows come from disjoint files of the local
corpus, split as `flora train` splits it (:func:`flora.train.convert_cli.corpus`). Prints a
markdown table and writes it, with the command and the machine, to docs/results/conversion.md.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from flora.adapters import AdapterBatch, AdapterKind, BankConfig, LoraWeights
from flora.bench.report import machine
from flora.model import GPTBigCode, load_adapter_dir, load_model
from flora.model.checkpoint import resolve_model_dir
from flora.train import conversion
from flora.train.convert_cli import corpus, corpus_windows

LORA_SLOT, FLORA_SLOT = 0, 1
BASE = -1  # no adapter


@dataclass
class Row:
    label: str
    weighting: str
    weight_error: float
    abs_logit: float
    kl: float
    loss: float


@torch.no_grad()
def compare(net: GPTBigCode, windows: torch.Tensor, slot: int, batch: int) -> tuple[float, ...]:
    """Mean |Δlogit| and KL(p_LoRA ‖ p_slot) per token vs the LoRA slot, and the slot's loss."""
    abs_sum = kl_sum = loss_sum = 0.0
    tokens = 0
    for chunk in windows.to(net.device).split(batch):
        ids, labels = chunk[:, :-1], chunk[:, 1:]
        n = ids.numel()
        teacher = net(ids, AdapterBatch.from_slots([LORA_SLOT] * n, device=net.device)).float()
        student = net(ids, AdapterBatch.from_slots([slot] * n, device=net.device)).float()
        abs_sum += float((student - teacher).abs().mean(-1).sum())
        log_t, log_s = F.log_softmax(teacher, -1), F.log_softmax(student, -1)
        kl_sum += float((log_t.exp() * (log_t - log_s)).sum())
        loss_sum += float(F.cross_entropy(student.flatten(0, 1), labels.flatten(), reduction="sum"))
        tokens += n
    return abs_sum / tokens, kl_sum / tokens, loss_sum / tokens


def mean_weight_error(
    net: GPTBigCode, lora: dict[str, LoraWeights], flora: dict, weights: dict | None = None
) -> float:
    errors = []
    for path, fit in flora.items():
        W0 = conversion.base_weight(net, path)
        w = None if weights is None else weights[path].to(W0.device)[None, :]
        target = conversion.lora_target(W0, lora[path])
        errors.append(conversion.relative_weight_error(W0, target, fit, weights=w))
    return sum(errors) / len(errors)


def recovered(row: Row, base: Row, lora: Row) -> float:
    """The share of the LoRA's held-out loss gain over the base that ``row`` keeps."""
    gain = base.loss - lora.loss
    return (base.loss - row.loss) / gain if gain else float("nan")


def table(rows: list[Row]) -> list[str]:
    base, lora = rows[0], rows[1]
    lines = [
        "| adapter | weighting | rel. weight error | mean abs Δlogit | KL(LoRA ‖ ·) "
        "| held-out loss | LoRA gain kept |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.label} | {r.weighting} | {r.weight_error:.4f} | {r.abs_logit:.4f} | "
            f"{r.kl:.5f} | {r.loss:.4f} | {100 * recovered(r, base, lora):.0f}% |"
        )
    return lines


def findings(rows: list[Row]) -> list[str]:
    """What the table says, in sentences computed from it (the interpretation is the reader's)."""
    base, lora, fits = rows[0], rows[1], rows[2:]
    if not fits:
        return []
    best_kl = min(fits, key=lambda r: r.kl)
    best_loss = min(fits, key=lambda r: r.loss)
    by_rank: dict[str, list[Row]] = {}
    for r in fits:
        by_rank.setdefault(r.label, []).append(r)
    weight = [min(rs, key=lambda r: r.weight_error) for rs in by_rank.values()]
    return [
        f"- The LoRA lowers held-out loss from {base.loss:.4f} to {lora.loss:.4f}.",
        "- Weight space: the best relative error per rank is "
        + ", ".join(f"{r.label.split()[-1]} {r.weight_error:.3f}" for r in weight)
        + " (1.0 = the base model).",
        f"- Closest to the LoRA's outputs: {best_kl.label} ({best_kl.weighting}), "
        f"KL {best_kl.kl:.5f} nats/token (base: {base.kl:.5f}).",
        f"- Lowest held-out loss: {best_loss.label} ({best_loss.weighting}), "
        f"{best_loss.loss:.4f}, keeping {100 * recovered(best_loss, base, lora):.0f}% of the "
        "LoRA's gain.",
    ]


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("model_dir", help="base model directory (HF layout) or cached model id")
    p.add_argument("lora_dir", help="PEFT LoRA adapter directory for that model")
    p.add_argument("--ranks", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    p.add_argument("--language", default="python", help="corpus language (default python)")
    p.add_argument("--calibration-windows", type=int, default=32)
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--iters", type=int, default=conversion.DEFAULT_ITERS, help="ALS rounds")
    p.add_argument(
        "--distill-steps",
        type=int,
        default=0,
        help="also distil each activation-weighted fit for this many steps (default 0: off)",
    )
    p.add_argument("--batch", type=int, default=4, help="windows per forward pass")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="docs/results/conversion.md")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    started = time.perf_counter()
    model_dir = resolve_model_dir(args.model_dir)
    net = load_model(model_dir, device=args.device)
    adapter = load_adapter_dir(args.lora_dir, net.args)
    if adapter.kind is not AdapterKind.LORA:
        print(f"error: {args.lora_dir} holds a {adapter.kind} adapter, not LoRA", file=sys.stderr)
        return 2
    lora = {p: w for p, w in adapter.layers.items() if isinstance(w, LoraWeights)}
    seq_len = min(args.seq_len, net.args.n_positions)
    text = corpus(model_dir, args.language)
    calib = corpus_windows(text, args.calibration_windows, seq_len, seed=args.seed)
    held = corpus_windows(text, args.eval_windows, seq_len, held_out=True)
    s = conversion.collect_calibration(net, calib[:, :-1], batch_size=args.batch)

    max_rank = max(*args.ranks, adapter.rank)
    kinds = frozenset({AdapterKind.FLORA, AdapterKind.LORA})
    net.enable_adapters(adapter.targets, BankConfig(max_slots=2, max_rank=max_rank, kinds=kinds))
    net.load_adapter(LORA_SLOT, lora)
    rows = [
        Row("base model", "–", 1.0, *compare(net, held, BASE, args.batch)),
        Row(f"LoRA r{adapter.rank}", "–", 0.0, *compare(net, held, LORA_SLOT, args.batch)),
    ]
    print("\n".join(table(rows)), flush=True)
    for weighting in ("plain", "activation"):
        calibration = s if weighting == "activation" else None
        for rank in args.ranks:
            flora = conversion.convert_lora(
                net, lora, rank, calibration=calibration, iters=args.iters, seed=args.seed
            )
            fits = [(weighting, flora)]
            if weighting == "activation" and args.distill_steps > 0:
                refined = conversion.distill(
                    net, lora, flora, calib[:, :-1], steps=args.distill_steps, seed=args.seed
                )
                fits.append((f"activation + distil {args.distill_steps}", refined))
            for label, fit in fits:
                net.load_adapter(FLORA_SLOT, fit)
                row = Row(
                    f"FLoRA r{rank}",
                    label,
                    mean_weight_error(net, lora, fit),
                    *compare(net, held, FLORA_SLOT, args.batch),
                )
                rows.append(row)
                print(table([*rows[:2], row])[-1], flush=True)

    elapsed = time.perf_counter() - started
    command = "python scripts/conversion_report.py " + shlex.join(argv)
    lines = [
        "# LoRA → FLoRA conversion",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine(torch.device(args.device))}  ",
        f"Run time: {elapsed:.0f} s",
        "",
        f"Base model `{model_dir}` ({net.args.num_parameters() / 1e6:.1f}M parameters); LoRA "
        f"`{args.lora_dir}` (r{adapter.rank}, targets {', '.join(adapter.targets)}, "
        f"{len(lora)} layers). Conversion: weighted alternating least squares for "
        f"W0 ∘ (B A / r) ≈ W0 + scale·B_l A_l, at most {args.iters} rounds; *plain* weights "
        "every weight alike, *activation* weights input feature j by mean x_j² over "
        f"{args.calibration_windows} calibration windows of {seq_len} {args.language} tokens. "
        f"Metrics vs the LoRA model on {held.shape[0]} held-out windows (`flora train`'s "
        "held-out files: neither the LoRA nor the calibration saw them): "
        "rel. weight error = ‖W0 ∘ M − T‖ / ‖T − W0‖ (plain norm, mean over "
        "layers; 1.0 = the base model), mean |Δlogit| per vocabulary entry, KL(p_LoRA ‖ p) per "
        "token (nats), and next-token cross-entropy.",
        "",
        *table(rows),
        "",
        "## What works",
        "",
        *findings(rows),
        "",
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print(f"\nwrote {out} ({elapsed:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
