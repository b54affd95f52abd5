"""A small random-weight GPTBigCode, a directory of mixed adapters, and reference decoders.

Weights are perturbed well away from init so different adapters give different tokens, and
the reference decodes with the plain dense forward (no KV cache, no scheduler), so the engine's
paged, chunked, batched path is checked against something that shares none of its machinery.
"""

from __future__ import annotations

import copy
import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from flora.adapters import AdapterBatch, AdapterKind, FloraWeights, IA3Weights, LoraWeights
from flora.engine import EngineConfig, LLMEngine, LocalAdapterSource
from flora.model import GPTBigCode, ModelArgs, load_adapter_dir, save_adapter_dir

# FLORA_TEST_DEVICE=cuda runs the same checks on a GPU (scripts/gpu-bench.sh does).
DEVICE = os.environ.get("FLORA_TEST_DEVICE", "cpu")
# FLORA_TEST_COMPILE=default (or max) runs them with the engine's compiled blocks.
COMPILE = os.environ.get("FLORA_TEST_COMPILE", "off")
ARGS = ModelArgs(
    vocab_size=512, n_positions=160, n_embd=64, n_layer=2, n_head=4, n_inner=128, eos_token_id=0
)
# name → (kind, rank)
ADAPTERS: dict[str, tuple[AdapterKind, int]] = {
    "flora-r1-a": (AdapterKind.FLORA, 1),
    "flora-r1-b": (AdapterKind.FLORA, 1),
    "flora-r2": (AdapterKind.FLORA, 2),
    "flora-r4": (AdapterKind.FLORA, 4),
    "flora-r8": (AdapterKind.FLORA, 8),
    "lora-r1": (AdapterKind.LORA, 1),
    "lora-r4": (AdapterKind.LORA, 4),
    "lora-r8-a": (AdapterKind.LORA, 8),
    "lora-r8-b": (AdapterKind.LORA, 8),
    "ia3-a": (AdapterKind.IA3, 1),
    "ia3-b": (AdapterKind.IA3, 1),
    "flora-r1-c": (AdapterKind.FLORA, 1),
    "lora-r2": (AdapterKind.LORA, 2),
    "flora-r16": (AdapterKind.FLORA, 16),
    "lora-r16": (AdapterKind.LORA, 16),
}


@pytest.fixture
def seed() -> int:
    value = int(os.environ.get("FLORA_TEST_SEED", random.SystemRandom().randrange(2**31)))
    print(f"FLORA_TEST_SEED={value}")
    return value


def random_adapter(kind: AdapterKind, rank: int, gen: torch.Generator) -> dict:
    """Weights for every layer's c_attn that move the logits well away from the base model."""
    k, d = ARGS.n_embd, ARGS.n_embd + 2 * ARGS.head_dim
    layers = {}
    for i in range(ARGS.n_layer):
        name = f"transformer.h.{i}.attn.c_attn"
        if kind is AdapterKind.FLORA:
            a = 1 + 0.8 * torch.randn(rank, k, generator=gen)
            b = 1 + 0.8 * torch.randn(d, rank, generator=gen)
            layers[name] = FloraWeights(a, b)
        elif kind is AdapterKind.LORA:
            a = torch.randn(rank, k, generator=gen) * k**-0.5
            b = torch.randn(d, rank, generator=gen)
            layers[name] = LoraWeights(a, b, alpha=2.0 * rank)
        else:
            layers[name] = IA3Weights(1 + 0.8 * torch.randn(d, generator=gen))
    return layers


@pytest.fixture(scope="session")
def base_model() -> GPTBigCode:
    net = GPTBigCode(ARGS).init_weights(seed=11)
    gen = torch.Generator().manual_seed(12)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.15 * torch.randn(p.shape, generator=gen))
    return net.to(DEVICE).eval().requires_grad_(False)


@pytest.fixture(scope="session")
def adapter_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("adapters")
    gen = torch.Generator().manual_seed(13)
    for name, (kind, rank) in ADAPTERS.items():
        save_adapter_dir(root / name, kind, random_adapter(kind, rank, gen))
    return root


@pytest.fixture
def make_engine(
    base_model: GPTBigCode, adapter_root: Path, tmp_path: Path
) -> Callable[..., LLMEngine]:
    engines: list[LLMEngine] = []

    def make(adapters: bool = True, **config) -> LLMEngine:
        config.setdefault("adapter_cache_dir", tmp_path / "cache")
        config.setdefault("block_size", 4)
        config.setdefault("device", DEVICE)
        config.setdefault("compile", COMPILE)
        source = LocalAdapterSource(root=adapter_root) if adapters else None
        engine = LLMEngine(copy.deepcopy(base_model), None, EngineConfig(**config), source)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.close()


@pytest.fixture
def reference(base_model: GPTBigCode, adapter_root: Path) -> Callable[..., list[int]]:
    """Greedy tokens from the dense forward, with the adapter loaded into slot 0."""
    net = copy.deepcopy(base_model)
    net.enable_adapters(("c_attn",))

    def greedy(prompt: list[int], max_tokens: int, adapter: str | None = None) -> list[int]:
        slot = -1
        if adapter is not None:
            net.load_adapter(0, load_adapter_dir(adapter_root / adapter, ARGS).layers)
            slot = 0
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(max_tokens):
                batch = AdapterBatch.from_slots([slot] * len(ids), device=DEVICE)
                logits = net(torch.tensor([ids], device=DEVICE), batch)
                ids.append(int(logits[0, -1].argmax()))
        return ids[len(prompt) :]

    return greedy


def random_prompts(seed: int, lengths: list[int]) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(1, ARGS.vocab_size, (n,), generator=gen).tolist() for n in lengths]


def tokens_of(outputs) -> list[int]:
    return [t for o in outputs for t in o.token_ids]


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE with ARGS.vocab_size entries, trained on some of the stdlib's code."""
    import json
    import sysconfig

    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [p.read_text(errors="ignore") for p in sorted(stdlib.glob("[a-c]*.py"))[:40]]
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=ARGS.vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    out = tmp_path_factory.mktemp("tokenizer")
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return out
