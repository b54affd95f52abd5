"""Engine failures reach the client typed, over a real registry, engine and HTTP:

- an adapter whose activations overflow is that tenant's 422 ``adapter_numerical_error``,
  streamed or not, while a bystander in the same steps is served its solo answer;
- an adapter the engine refuses to load — registered by a registry that did not know this
  engine's limits (a standalone registry process on the same store, or an engine restarted
  with a lower ``max_rank``) — is a 422 ``adapter_not_servable`` naming the limit.

The engine's ``max_adapter_magnitude`` is raised to 3e38 here so the overflowing adapter gets
past the upload check (tests/adapter_format shows the default refuses it).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from adapter_registry import BaseModelCatalog, BaseModelSpec, Registry, RegistryError
from adapter_registry.registry import AdapterMeta, Principal
from flora.adapters import AdapterKind, LoraWeights
from flora.model import save_adapter_dir
from tests.serve.conftest import ADMIN_KEY, MODEL_NAME, Stack, random_adapter_dir

PROMPT = {"prompt": "def add(a, b):", "max_tokens": 12, "temperature": 0}


@pytest.fixture(scope="module")
def guard_off(tmp_path_factory: pytest.TempPathFactory, micro_dir: Path) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("engine-errors")
    stack = Stack(root / "stack", micro_dir, engine={"max_adapter_magnitude": 3e38})
    args = stack.model_args
    qkv = args.n_embd + 2 * args.head_dim
    layers = {
        f"transformer.h.{i}.attn.c_attn": LoraWeights(
            torch.ones(1, args.n_embd), torch.full((qkv, 1), 1e37), 1.0
        )
        for i in range(args.n_layer)
    }
    boom = save_adapter_dir(root / "boom", AdapterKind.LORA, layers, base_model=MODEL_NAME)
    with stack.client(ADMIN_KEY) as admin:
        key = admin.create_tenant("acme")[1]
    with stack.client(key) as acme:
        acme.register(boom, "boom")
    yield {"stack": stack, "key": key, "root": root}
    stack.close()


def post(url: str, key: str, body: dict) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"}
    return httpx.post(url + "/v1/completions", json=body, headers=headers, timeout=60)


@pytest.mark.parametrize("stream", [False, True])
def test_an_overflowing_adapter_is_the_tenants_422(guard_off, stream):
    stack, key = guard_off["stack"], guard_off["key"]
    response = post(stack.url, key, PROMPT | {"model": "boom", "stream": stream})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "adapter_numerical_error" and error["type"] == "invalid_request_error"
    assert "acme/boom@1" in error["message"] and "non-finite" in error["message"]


def test_a_bystander_in_the_same_steps_is_served_its_solo_answer(guard_off):
    stack, key = guard_off["stack"], guard_off["key"]
    solo = post(stack.url, key, PROMPT | {"model": "base", "logprobs": 1}).json()

    async def together() -> list[httpx.Response]:
        headers = {"Authorization": f"Bearer {key}"}
        async with httpx.AsyncClient(base_url=stack.url, headers=headers, timeout=60) as client:
            bodies = [PROMPT | {"model": "base", "logprobs": 1}] + [PROMPT | {"model": "boom"}] * 4
            return await asyncio.gather(*(client.post("/v1/completions", json=b) for b in bodies))

    bystander, *attacks = asyncio.run(together())
    assert [a.status_code for a in attacks] == [422] * 4
    got = json.loads(bystander.text)  # strict JSON: a NaN logprob would not parse as a number
    assert got["choices"][0]["text"] == solo["choices"][0]["text"]
    assert got["choices"][0]["logprobs"]["token_logprobs"] == pytest.approx(
        solo["choices"][0]["logprobs"]["token_logprobs"], abs=1e-4
    )


def test_an_adapter_over_the_engines_limits_is_a_422_naming_the_limit(guard_off, micro_dir):
    stack, key, root = guard_off["stack"], guard_off["key"], guard_off["root"]
    directory = random_adapter_dir(
        root / "r16", AdapterKind.LORA, 16, 1, stack.model_args, MODEL_NAME
    )
    # a registry process that never heard from a replica: the format's own limits (rank 256)
    spec = BaseModelSpec.from_hf_config(
        MODEL_NAME, json.loads((micro_dir / "config.json").read_text())
    )
    standalone = Registry(
        stack.registry.index, stack.registry.blobs, BaseModelCatalog([spec]), admin_key=ADMIN_KEY
    )
    standalone.register(
        Principal("acme"),
        AdapterMeta("r16"),
        (directory / "adapter_config.json").read_bytes(),
        (directory / "adapter_model.safetensors").read_bytes(),
    )
    response = post(stack.url, key, PROMPT | {"model": "r16"})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "adapter_not_servable"
    assert "rank 16 exceeds this server's max_rank 8" in error["message"]
    assert post(stack.url, key, PROMPT | {"model": "base"}).status_code == 200


def test_uploads_over_the_served_engines_limits_are_refused(guard_off):
    """The ingress learned the replica's limits: the same adapter is a 422 at upload."""
    stack, key, root = guard_off["stack"], guard_off["key"], guard_off["root"]
    directory = random_adapter_dir(
        root / "r16-upload", AdapterKind.LORA, 16, 1, stack.model_args, MODEL_NAME
    )
    with (
        stack.client(key) as acme,
        pytest.raises(RegistryError, match="rank 16 exceeds this server's max_rank 8") as caught,
    ):
        acme.register(directory, "r16-upload")
    assert caught.value.status == 422
