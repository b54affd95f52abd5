"""Build a small StarCoder-architecture model and tokenizer from code on this machine, offline.

Serving tests and the demo need a checkpoint that both our loader and transformers read, with a
real tokenizer, and no network to fetch one; ``serve`` builds it on first start when asked for
``model: tiny``. :func:`make_tiny_model` collects source code (:mod:`flora.model.tiny.corpus`),
trains a byte-level BPE (:mod:`flora.model.tiny.bpe`), initialises a :class:`GPTBigCode` from a
preset and, if asked, pre-trains it for a time budget on random windows of the corpus:

    loss = mean_t CE(logits[t], x[t+1]),  lr(t) = lr · warmup(t) · (0.1 + 0.45 · (1 + cos(π t / T)))

:func:`ensure_tiny_model` reuses a directory built with the same options, so a cache dir is cheap.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from flora import __version__
from flora.model.checkpoint import save_model
from flora.model.config import PRESETS, ModelArgs
from flora.model.model import GPTBigCode
from flora.model.tiny.bpe import EOS_TOKEN, save_tokenizer, train_tokenizer
from flora.model.tiny.corpus import collect, corpus_stats, split_holdout
from flora.model.tokenizer import Tokenizer

RECORD = "flora_model.json"
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", RECORD)
# The untrained "micro" model must build in seconds (tests), so its corpus is small.
CORPUS_BYTES = {"micro": 32_000}
DEFAULT_CORPUS_BYTES = 1_000_000
HELD_OUT_FRACTION = 0.05
EVAL_WINDOWS = 8
WARMUP_STEPS = 20
SAMPLE_PROMPT = "def "


class TinyModelOptions(BaseModel):
    """Everything that decides what :func:`make_tiny_model` builds (recorded with the model)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    preset: str = Field("tiny", description="A name in flora.model.config.PRESETS.")
    vocab_size: int | None = Field(None, description="BPE size; None takes the preset's.")
    train_seconds: float = Field(0.0, ge=0.0, description="Pre-training budget; 0 = untrained.")
    languages: tuple[str, ...] | None = Field(
        None, description="Corpus languages; None takes every language found on this machine."
    )
    seed: int = Field(0, description="Seeds the corpus sample, weights and training windows.")
    max_bytes_per_language: int | None = Field(
        None, gt=0, description="Corpus budget per language; None = 32 KB for micro, else 1 MB."
    )
    seq_len: int = Field(128, ge=8, description="Training window (capped at the context).")
    batch_size: int = Field(8, ge=1)
    lr: float = Field(2e-3, gt=0.0, description="Peak AdamW learning rate after warm-up.")

    def resolved(self) -> TinyModelOptions:
        """Nones replaced by the preset's defaults, so equal builds compare equal."""
        if self.preset not in PRESETS:
            raise ValueError(f"unknown model preset {self.preset!r}; choose from {sorted(PRESETS)}")
        return self.model_copy(
            update={
                "vocab_size": self.bpe_size,
                "max_bytes_per_language": self.corpus_bytes,
                "seq_len": min(self.seq_len, ModelArgs.preset(self.preset).n_positions),
            }
        )

    @property
    def bpe_size(self) -> int:
        return self.vocab_size or ModelArgs.preset(self.preset).vocab_size

    @property
    def corpus_bytes(self) -> int:
        return self.max_bytes_per_language or CORPUS_BYTES.get(self.preset, DEFAULT_CORPUS_BYTES)


def make_tiny_model(
    out_dir: str | Path,
    *,
    preset: str = "tiny",
    vocab_size: int | None = None,
    train_seconds: float = 0.0,
    languages: Sequence[str] | None = None,
    seed: int = 0,
    max_bytes_per_language: int | None = None,
    seq_len: int = 128,
    batch_size: int = 8,
    lr: float = 2e-3,
    progress: bool = True,
) -> Path:
    """Build a checkpoint + tokenizer in ``out_dir`` (HF layout) and return its path.

    The options are those of :class:`TinyModelOptions`. The directory is written whole and
    then swapped in, so a crash never leaves a half-built model; a non-empty directory that was
    not built by this function is never replaced. With ``train_seconds=0`` the weights and
    tokenizer depend only on the options (and the files on this machine).
    """
    opts = TinyModelOptions(
        preset=preset,
        vocab_size=vocab_size,
        train_seconds=train_seconds,
        languages=None if languages is None else tuple(languages),
        seed=seed,
        max_bytes_per_language=max_bytes_per_language,
        seq_len=seq_len,
        batch_size=batch_size,
        lr=lr,
    ).resolved()
    out = Path(out_dir)
    _check_replaceable(out)
    started = time.perf_counter()
    corpus = collect(opts.languages, opts.corpus_bytes, opts.seed)
    train_texts, held_texts = split_holdout(corpus, HELD_OUT_FRACTION, opts.seed)
    hf_tokenizer = train_tokenizer(_flat(train_texts), opts.bpe_size)
    eos = hf_tokenizer.token_to_id(EOS_TOKEN)
    tokenizer = Tokenizer(hf_tokenizer, eos)
    base = ModelArgs.preset(opts.preset).model_dump()
    vocab = {"vocab_size": tokenizer.vocab_size, "bos_token_id": eos, "eos_token_id": eos}
    net = GPTBigCode(ModelArgs(**{**base, **vocab})).init_weights(opts.seed)

    held_stream = token_stream(tokenizer, _flat(held_texts))
    train_stream = None
    if opts.train_seconds or len(held_stream) <= opts.seq_len:
        train_stream = token_stream(tokenizer, _flat(train_texts))
    # A corpus too small for a held-out window is evaluated on training text instead.
    eval_stream = held_stream if len(held_stream) > opts.seq_len else train_stream
    assert eval_stream is not None
    gen = torch.Generator().manual_seed(opts.seed)
    eval_batch = random_windows(eval_stream, EVAL_WINDOWS, opts.seq_len, gen)
    initial_loss = eval_loss(net, eval_batch)
    training: dict[str, float] = {"steps": 0, "tokens": 0, "seconds": 0.0}
    if opts.train_seconds and train_stream is not None:
        training = pretrain(net, train_stream, opts, gen, progress=progress)
    final_loss = eval_loss(net, eval_batch)
    sample = greedy_complete(net, tokenizer, SAMPLE_PROMPT, 48)

    record = {
        "built_by": f"flora {__version__} make-tiny-model",
        "options": opts.model_dump(mode="json"),
        "languages": list(corpus),
        "corpus": corpus_stats(corpus),
        "held_out_files": {k: len(v) for k, v in held_texts.items()},
        "vocab_size": tokenizer.vocab_size,
        "parameters": sum(p.numel() for p in net.parameters()),
        "initial_loss": round(initial_loss, 4),
        "final_loss": round(final_loss, 4),
        "training": training,
        "sample": {"prompt": SAMPLE_PROMPT, "completion": sample},
        "build_seconds": round(time.perf_counter() - started, 1),
        "versions": {"torch": torch.__version__},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache from other users
    try:
        save_model(net, tmp)
        save_tokenizer(hf_tokenizer, tmp, model_max_length=net.args.n_positions)
        (tmp / RECORD).write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
        _swap_in(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def ensure_tiny_model(out_dir: str | Path, *, progress: bool = True, **options: Any) -> Path:
    """``out_dir`` if it holds a model built with these options, else build it there.

    ``options`` are :func:`make_tiny_model`'s; a cache directory costs one build per option set.
    """
    out = Path(out_dir)
    if read_record(out, TinyModelOptions(**options)) is not None:
        return out
    return make_tiny_model(out, progress=progress, **options)


def read_record(directory: str | Path, options: TinyModelOptions | None = None) -> dict | None:
    """The build record of a complete tiny model (matching ``options`` if given), else None."""
    directory = Path(directory)
    if not all((directory / f).is_file() for f in REQUIRED_FILES):
        return None
    try:
        record = json.loads((directory / RECORD).read_text())
    except (OSError, ValueError):
        return None
    if options is not None:
        wanted = options.resolved().model_dump(mode="json")
        if not isinstance(record, dict) or record.get("options") != wanted:
            return None
    return record


# --- data and training ---------------------------------------------------------------------


def token_stream(tokenizer: Tokenizer, texts: Sequence[str]) -> torch.Tensor:
    """All texts as one id sequence ``[N]``, each followed by ``<|endoftext|>`` (as StarCoder)."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    encoded = tokenizer.inner.encode_batch_fast(list(texts), add_special_tokens=False)
    ids = [i for e in encoded for i in (*e.ids, eos)]
    return torch.tensor(ids, dtype=torch.long)


def random_windows(
    stream: torch.Tensor, n: int, seq_len: int, gen: torch.Generator
) -> torch.Tensor:
    """``n`` windows of ``seq_len + 1`` tokens at random offsets → ``[n, seq_len + 1]``."""
    if len(stream) <= seq_len:
        raise ValueError(f"corpus of {len(stream)} tokens is shorter than a {seq_len}-token window")
    starts = torch.randint(0, len(stream) - seq_len, (n,), generator=gen)
    return stream[starts[:, None] + torch.arange(seq_len + 1)]


def lm_loss(net: GPTBigCode, windows: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy over ``windows [B, S + 1]`` with the dense forward."""
    logits = net(windows[:, :-1])  # [B, S, V]
    return F.cross_entropy(logits.flatten(0, 1).float(), windows[:, 1:].flatten())


@torch.no_grad()
def eval_loss(net: GPTBigCode, windows: torch.Tensor) -> float:
    was_training = net.training
    loss = lm_loss(net.eval(), windows).item()
    net.train(was_training)
    return loss


def pretrain(
    net: GPTBigCode,
    stream: torch.Tensor,
    opts: TinyModelOptions,
    gen: torch.Generator,
    *,
    progress: bool = True,
) -> dict[str, float]:
    """AdamW on random windows until ``opts.train_seconds`` pass; returns what it did."""
    seconds = opts.train_seconds
    optimizer = torch.optim.AdamW(net.parameters(), lr=opts.lr, betas=(0.9, 0.95), weight_decay=0.1)
    net.train()
    bar = tqdm(
        total=round(seconds),
        unit="s",
        desc=f"pre-training {opts.preset}",
        disable=not progress,
        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total}s{postfix}",
    )
    steps, tokens, smooth = 0, 0, 0.0
    start = time.perf_counter()
    elapsed = 0.0
    while elapsed < seconds:
        # Warm up for WARMUP_STEPS or the first 5% of the budget, whichever ends first.
        warm = min(1.0, max((steps + 1) / WARMUP_STEPS, elapsed / (0.05 * seconds)))
        decay = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * elapsed / seconds))
        for group in optimizer.param_groups:
            group["lr"] = opts.lr * warm * decay
        batch = random_windows(stream, opts.batch_size, opts.seq_len, gen)
        loss = lm_loss(net, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
        steps += 1
        tokens += batch[:, 1:].numel()
        smooth = loss.item() if steps == 1 else 0.9 * smooth + 0.1 * loss.item()
        now = time.perf_counter() - start
        bar.update(min(seconds, now) - min(seconds, elapsed))
        bar.set_postfix_str(f"loss={smooth:.3f}, {tokens / now:,.0f} tok/s", refresh=False)
        elapsed = now
    bar.close()
    net.eval()
    return {
        "steps": steps,
        "tokens": tokens,
        "seconds": round(elapsed, 1),
        "train_loss": round(smooth, 4),
    }


@torch.no_grad()
def greedy_complete(
    net: GPTBigCode, tokenizer: Tokenizer, prompt: str, max_new_tokens: int = 48
) -> str:
    """The greedy continuation of ``prompt`` (dense forward, no cache): a quick look at a model."""
    ids = tokenizer.encode(prompt)
    new: list[int] = []
    for _ in range(max_new_tokens):
        context = torch.tensor([(ids + new)[-net.args.n_positions :]])
        token = int(net(context)[0, -1].argmax())
        if token == tokenizer.eos_token_id:
            break
        new.append(token)
    return tokenizer.decode(new)


# --- files ---------------------------------------------------------------------------------


def _flat(corpus: dict[str, list[str]]) -> list[str]:
    return [text for texts in corpus.values() for text in texts]


def _check_replaceable(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / RECORD).is_file():
        raise FileExistsError(
            f"{out} is not empty and holds no {RECORD}: it was not built by make-tiny-model, "
            "so it is left alone; choose an empty or new directory"
        )


def _swap_in(tmp: Path, out: Path) -> None:
    """Put the finished ``tmp`` at ``out``, removing an older build there."""
    _check_replaceable(out)
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
