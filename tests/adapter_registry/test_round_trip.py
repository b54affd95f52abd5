"""Adapters travel registry → replica intact: a real PEFT-saved LoRA and IA3 and a FLoRA adapter
are uploaded over HTTP, resolved, downloaded with their sha256 checked, and served by the engine
with the same logits and greedy tokens as the original — on both registry backends. Deleting an
adapter stops the engine serving it; another tenant never reaches it."""

from __future__ import annotations

import copy
import threading
import time
from pathlib import Path

import pytest
import torch
from peft import IA3Config, LoraConfig

from adapter_registry import Registry
from adapter_registry.client import RegistryClient
from flora.adapters import AdapterBatch, AdapterKind, FloraWeights
from flora.engine import EngineConfig, LLMEngine, Request, SamplingParams, UnknownAdapterError
from flora.engine.engine import run_to_completion
from flora.model import GPTBigCode, load_adapter_dir, load_model, save_adapter_dir, save_model
from flora.serve import RegistryAdapterSource
from tests.adapter_registry.conftest import SPEC
from tests.model.conftest import CONFIGS, FP32_ATOL, max_diff, random_ids, random_model
from tests.model.test_adapter_files import peft_adapter

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing`:FutureWarning")
ARGS = CONFIGS["mqa"]
NEW_TOKENS = 6


@pytest.fixture
def base(tmp_path: Path) -> tuple[Path, GPTBigCode]:
    gen = torch.Generator().manual_seed(7)
    directory = save_model(random_model(ARGS, gen), tmp_path / "base")
    return directory, load_model(directory)


def flora_dir(out: Path, gen: torch.Generator) -> Path:
    e, qkv = ARGS.n_embd, ARGS.n_embd + 2 * ARGS.head_dim
    layers = {
        f"transformer.h.{i}.attn.c_attn": FloraWeights(
            1 + 0.5 * torch.randn(2, e, generator=gen), 1 + 0.5 * torch.randn(qkv, 2, generator=gen)
        )
        for i in range(ARGS.n_layer)
    }
    return save_adapter_dir(out, AdapterKind.FLORA, layers, base_model=SPEC.name)


def make_adapters(base_dir: Path, tmp_path: Path):
    """name → (directory, logits function of the original implementation)."""
    gen = torch.Generator().manual_seed(11)
    lora = peft_adapter(
        base_dir,
        LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], init_lora_weights=False),
        gen,
        tmp_path / "lora",
    )
    ia3 = peft_adapter(
        base_dir,
        IA3Config(target_modules=["c_attn", "mlp.c_fc"], feedforward_modules=["mlp.c_fc"]),
        gen,
        tmp_path / "ia3",
    )
    return {
        "peft-lora": (tmp_path / "lora", lambda ids: lora(input_ids=ids).logits),
        "peft-ia3": (tmp_path / "ia3", lambda ids: ia3(input_ids=ids).logits),
        "flora": (flora_dir(tmp_path / "flora", gen), None),
    }


def greedy_dense(net: GPTBigCode, prompt: list[int], adapter_dir: Path) -> list[int]:
    """Greedy tokens from the dense forward with the adapter read straight from its files."""
    net = copy.deepcopy(net)
    net.enable_adapters(("c_attn", "mlp.c_fc"))
    net.load_adapter(0, load_adapter_dir(adapter_dir, ARGS).layers)
    ids = list(prompt)
    for _ in range(NEW_TOKENS):
        logits = net(torch.tensor([ids]), AdapterBatch.from_slots([0] * len(ids)))
        ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt) :]


def engine_for(net: GPTBigCode, source: RegistryAdapterSource, cache: Path) -> LLMEngine:
    config = EngineConfig(
        block_size=4,
        adapter_cache_dir=cache,
        adapter_targets=("c_attn", "mlp.c_fc"),
        max_rank=8,
    )
    return LLMEngine(copy.deepcopy(net), None, config, source)


def generate(engine: LLMEngine, prompt: list[int], adapter: str, tenant: str) -> list[int]:
    request = Request(
        prompt_ids=tuple(prompt),
        adapter=adapter,
        tenant=tenant,
        params=SamplingParams(max_tokens=NEW_TOKENS, temperature=0),
    )
    outputs = run_to_completion(engine, [request])[request.request_id]
    assert outputs[-1].error is None, outputs[-1].error
    return [t for o in outputs for t in o.token_ids]


def test_register_resolve_fetch_and_serve_gives_the_original_logits(
    registry: Registry, admin: RegistryClient, acme: RegistryClient, base, tmp_path: Path
):
    base_dir, net = base
    adapters = make_adapters(base_dir, tmp_path)
    records = {
        name: acme.register(directory, name, base_model=SPEC.name, language="python")
        for name, (directory, _) in adapters.items()
    }
    assert {r.kind for r in records.values()} == {"lora", "ia3", "flora"}

    source = RegistryAdapterSource(registry)
    engine = engine_for(net, source, tmp_path / "replica-cache")
    prompt = random_ids(torch.Generator().manual_seed(3), ARGS.vocab_size, 9).tolist()
    ids = torch.tensor([prompt])
    try:
        for name, (directory, original) in adapters.items():
            ref = source.resolve(name, "acme")
            fetched = source.fetch(ref, tmp_path / "fetched" / name)
            assert (fetched / "adapter_model.safetensors").read_bytes() == (
                directory / "adapter_model.safetensors"
            ).read_bytes()
            if original is not None:  # PEFT's own model is the oracle
                served = copy.deepcopy(net)
                served.enable_adapters(("c_attn", "mlp.c_fc"))
                served.load_adapter(0, load_adapter_dir(fetched, ARGS).layers)
                mine = served(ids, AdapterBatch.from_slots([0] * ids.numel()))
                with torch.no_grad():
                    assert max_diff(mine, original(ids)) <= FP32_ATOL, name
            tokens = generate(engine, prompt, name, "acme")
            assert tokens == greedy_dense(net, prompt, directory), name
    finally:
        engine.close()


def test_another_tenant_cannot_reach_an_adapter_and_a_deleted_one_stops_serving(
    registry: Registry, acme: RegistryClient, globex: RegistryClient, base, tmp_path: Path
):
    _, net = base
    gen = torch.Generator().manual_seed(5)
    acme.register(flora_dir(tmp_path / "a", gen), "py")
    source = RegistryAdapterSource(registry)
    engine = engine_for(net, source, tmp_path / "replica-cache")
    subscription = source.watch(engine, tmp_path / "replica-cache")
    prompt = [1, 2, 3, 4]
    try:
        generate(engine, prompt, "py", "acme")
        assert "acme/py@1" in engine.adapters.resident()
        with pytest.raises(UnknownAdapterError):
            engine.add_request(Request(prompt_ids=(1, 2), adapter="py", tenant="globex"))

        dropped = threading.Event()
        original = engine.invalidate_adapter

        def spy(name: str) -> None:
            original(name)
            dropped.set()

        engine.invalidate_adapter = spy
        acme.delete("py")
        assert dropped.wait(10), "the deletion event never reached the engine"
        assert "acme/py@1" not in engine.adapters.resident()
        assert not (tmp_path / "replica-cache" / "acme" / "py" / "1").exists()
        with pytest.raises(UnknownAdapterError):
            engine.add_request(Request(prompt_ids=(1, 2), adapter="py", tenant="acme"))
    finally:
        subscription.close()
        engine.close()


def test_a_cached_resolution_keeps_serving_while_the_index_is_down(
    registry: Registry, acme: RegistryClient, tmp_path: Path
):
    """Fault injection by replacing the index with one that always fails (a mock, as the brief
    allows): the real-outage version runs in test_outages.py against a killed redis-server."""
    from adapter_registry import Unavailable

    acme.register(flora_dir(tmp_path / "a", torch.Generator().manual_seed(2)), "py")
    source = RegistryAdapterSource(registry)
    before = source.resolve("py", "acme")

    class Down:
        def __getattr__(self, name):
            def fail(*args, **kwargs):
                raise Unavailable("index down")

            return fail

    real, registry.index = registry.index, Down()
    try:
        assert source.resolve("py", "acme") == before
        with pytest.raises(Unavailable):
            source.resolve("other", "acme")
    finally:
        registry.index = real
    time.sleep(0)  # nothing else to wait for; keeps the fixture order obvious
