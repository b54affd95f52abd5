"""FLoRA Serve end to end: `serve run deployments/starcoder.yaml` (real Ray Serve, the YAML's
own args), tenants and adapters created over REST, OpenAI-compatible calls over HTTP.

Greedy outputs must equal the engine called directly in this process with the same adapter
files and the YAML's engine settings (fp32 on CPU); tenants are isolated; bad input gets
OpenAI-shaped 4xx and the server keeps serving. See conftest.py for how the server is started.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx
import openai
import pytest
import torch

from adapter_registry import NotFound
from adapter_registry.client import RegistryClient
from flora.adapters import AdapterKind
from flora.engine import LLM, EngineConfig, Request, SamplingParams
from flora.engine.llm import Completion
from flora.model import ModelArgs
from flora.serve.config import ServeArgs
from tests.e2e.conftest import ADMIN_KEY, ServeRun
from tests.serve.conftest import random_adapter_dir

MODEL_NAME = "flora/tiny"  # what the demo YAML serves
MAX_TOKENS = 8
PROMPT = "def add(a, b):"
QUESTION = "Write a Python function that adds two numbers."
ADAPTERS = {  # (tenant, name): kind, rank, seed
    ("acme", "py"): (AdapterKind.FLORA, 2, 1),
    ("acme", "c"): (AdapterKind.LORA, 4, 2),
    ("acme", "ia3"): (AdapterKind.IA3, 1, 3),
    ("globex", "py"): (AdapterKind.FLORA, 1, 4),
}


@dataclass(frozen=True)
class Case:
    """One request: over HTTP (``path``, ``body``) and straight to the engine (``request``)."""

    tenant: str
    model: str  # "base" or one of the tenant's adapters
    chat: bool
    stream: bool
    text: str

    @property
    def path(self) -> str:
        return f"/tenants/{self.tenant}/v1/" + ("chat/completions" if self.chat else "completions")

    def body(self) -> dict:
        body = {"model": self.model, "max_tokens": MAX_TOKENS, "temperature": 0}
        if self.chat:
            return body | {"messages": [{"role": "user", "content": self.text}]}
        return body | {"prompt": self.text}

    def request(self) -> Request:
        prompt, stop = self.text, ()
        if self.chat:  # the server's chat template and stop string, written out independently
            prompt, stop = f"### User:\n{self.text}\n\n### Assistant:\n", ("\n### User:",)
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, stop=stop)
        adapter = None if self.model == "base" else f"{self.tenant}-{self.model}"
        return Request(prompt=prompt, params=params, adapter=adapter, tenant=self.tenant)


@pytest.fixture(scope="module")
def world(served: ServeRun, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Tenants acme and globex, created with the admin key; their adapters, uploaded with their
    own keys; all over the REST API of the running deployment."""
    args = ModelArgs.from_dir(served.model_dir)  # the served model's shapes
    root = tmp_path_factory.mktemp("e2e-adapters")
    dirs = {
        key: random_adapter_dir(root / "-".join(key), kind, rank, seed, args, MODEL_NAME)
        for key, (kind, rank, seed) in ADAPTERS.items()
    }
    with RegistryClient(served.url, ADMIN_KEY) as admin:
        keys = {t: admin.create_tenant(t)[1] for t in ("acme", "globex")}
    for (tenant, name), directory in dirs.items():
        with RegistryClient(served.url, keys[tenant]) as client:
            client.register(directory, name, language="python" if name == "py" else None)
    return {"keys": keys, "dirs": dirs}


@pytest.fixture(scope="module")
def reference(
    served: ServeRun, world: dict, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[[list[Case]], list[Completion]]]:
    """The engine called directly: same checkpoint, adapter files and engine settings."""
    args = ServeArgs.model_validate(served.app_args)
    cache = tmp_path_factory.mktemp("direct-adapter-cache")
    config = EngineConfig(
        device=args.device, dtype=args.dtype, **args.engine | {"adapter_cache_dir": cache}
    )
    assert config.torch_dtype is torch.float32, "greedy tokens compare in the server's dtype"
    adapters = {f"{t}-{n}": d for (t, n), d in world["dirs"].items()}
    llm = LLM(served.model_dir, config, adapters=adapters)
    threads = torch.get_num_threads()

    def run(cases: list[Case]) -> list[Completion]:
        torch.set_num_threads(args.torch_threads or threads)  # as the replica runs
        try:
            return llm.generate([c.request() for c in cases])
        finally:
            torch.set_num_threads(threads)

    yield run
    llm.engine.close()


def bearer(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "code", "param"} and error["message"]
    return error


async def call(client: httpx.AsyncClient, key: str, case: Case) -> tuple[str, int, str]:
    """``(text, completion tokens, x-flora-adapter)`` of one request, streamed or not."""
    if not case.stream:
        response = await client.post(case.path, json=case.body(), headers=bearer(key))
        assert response.status_code == 200, response.text
        data = response.json()
        choice = data["choices"][0]
        text = choice["message"]["content"] if case.chat else choice["text"]
        return text, data["usage"]["completion_tokens"], response.headers["x-flora-adapter"]
    body = case.body() | {"stream": True}
    async with client.stream("POST", case.path, json=body, headers=bearer(key)) as response:
        assert response.status_code == 200, await response.aread()
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] async for line in response.aiter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]", events[-3:]
    chunks = [json.loads(e) for e in events[:-1]]
    if case.chat:
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    else:
        text = "".join(c["choices"][0]["text"] for c in chunks)
    return text, chunks[-1]["usage"]["completion_tokens"], response.headers["x-flora-adapter"]


def test_ready_serves_the_yaml_model(served, world):
    assert httpx.get(served.url + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(served.url + "/readyz")
    assert ready.status_code == 200 and ready.json()["model"] == MODEL_NAME
    models = httpx.get(served.url + "/v1/models", headers=bearer(world["keys"]["acme"])).json()
    assert {m["id"] for m in models["data"]} == {MODEL_NAME, "base", "py", "c", "ia3"}


def test_adapters_live_where_the_environment_says(served, world):
    """The registry backend is chosen by the environment of `serve run`, as documented."""
    store = served.extra_env.get("FLORA_STORE_URL")
    if store is None:  # embedded: files under $FLORA_DATA_DIR
        versions = list((served.workdir / "data" / "registry" / "blobs").glob("acme/*/1"))
        assert versions
        for version in versions:
            files = sorted(p.name for p in version.iterdir())
            assert files == ["adapter_config.json", "adapter_model.safetensors"]
        return
    import boto3
    import redis

    env = served.extra_env
    s3 = boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
    )
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="flora-e2e")["Contents"]]
    assert any(k.startswith("adapters/acme/py/1/") for k in keys), keys
    index = redis.Redis.from_url(served.extra_env["FLORA_REDIS_URL"], decode_responses=True)
    assert index.hexists("flora:tenants", "acme")
    assert not (served.workdir / "data" / "registry" / "blobs").exists()


def test_concurrent_mixed_requests_equal_the_engine_called_directly(served, world, reference):
    """16 requests at once from two tenants: four adapters of three kinds and the base model,
    completions and chat, half of them streamed; each equals its direct greedy output."""
    models = {"acme": ["base", "py", "c", "ia3"], "globex": ["py", "base"]}
    cases = []
    for i in range(16):
        tenant = "globex" if i % 4 == 3 else "acme"
        model = models[tenant][i % len(models[tenant])]
        chat = (i // 2) % 2 == 1
        text = f"Write function number {i} in Python." if chat else f"def f{i}(x):\n    return"
        cases.append(Case(tenant, model, chat=chat, stream=i % 2 == 0, text=text))

    async def all_at_once() -> list[tuple[str, int, str]]:
        async with httpx.AsyncClient(base_url=served.url, timeout=120) as client:
            calls = [call(client, world["keys"][c.tenant], c) for c in cases]
            return await asyncio.gather(*calls)

    answers = asyncio.run(all_at_once())
    expected = reference(cases)
    for case, (text, tokens, adapter), want in zip(cases, answers, expected, strict=True):
        assert want.error is None and want.token_ids
        assert text == want.text, case
        assert tokens == len(want.token_ids), case
        assert adapter == ("base" if case.model == "base" else f"{case.model}@1"), case
    # the adapters are not ignored: one prompt, four acme models, four different answers
    same = [Case("acme", m, chat=False, stream=False, text=PROMPT) for m in models["acme"]]
    assert len({c.text for c in reference(same)}) == 4


def test_the_official_openai_client_works_unmodified(served, world, reference):
    key = world["keys"]["acme"]
    client = openai.OpenAI(base_url=served.url + "/tenants/acme/v1", api_key=key, max_retries=0)
    completion = client.completions.create(
        model="py", prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0
    )
    messages = [{"role": "user", "content": QUESTION}]
    chat = client.chat.completions.create(
        model="c", messages=messages, max_tokens=MAX_TOKENS, temperature=0
    )
    streamed = client.chat.completions.create(
        model="c", messages=messages, max_tokens=MAX_TOKENS, temperature=0, stream=True
    )
    streamed_text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    streamed_completion = client.completions.create(
        model="py", prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, stream=True
    )
    streamed_completion_text = "".join(c.choices[0].text for c in streamed_completion)
    want_completion, want_chat = reference(
        [Case("acme", "py", False, False, PROMPT), Case("acme", "c", True, False, QUESTION)]
    )
    assert completion.choices[0].text == want_completion.text == streamed_completion_text
    assert completion.usage.completion_tokens == len(want_completion.token_ids)
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == want_chat.text == streamed_text
    listed = {m.id for m in client.models.list()}
    assert listed == {MODEL_NAME, "base", "py", "c", "ia3"}
    plain = openai.OpenAI(base_url=served.url + "/v1", api_key=key, max_retries=0)
    assert {m.id for m in plain.models.list()} == listed


def test_tenants_cannot_use_or_see_each_others_adapters(served, world, reference):
    globex = world["keys"]["globex"]
    body = {"prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0}
    for path in ("/tenants/globex/v1/completions", "/v1/completions"):
        for model in ("c", "c@1", "ia3", "base:c"):
            response = httpx.post(
                served.url + path, json=body | {"model": model}, headers=bearer(globex)
            )
            error = error_of(response, 404)
            assert error["param"] == "model", error
    listed = httpx.get(served.url + "/tenants/globex/v1/models", headers=bearer(globex)).json()
    assert {m["id"] for m in listed["data"]} == {MODEL_NAME, "base", "py"}
    with RegistryClient(served.url, globex) as client:
        assert [r.name for r in client.list()] == ["py"]
        with pytest.raises(NotFound):
            client.show("c")
    # a key used on another tenant's path
    error = error_of(
        httpx.post(
            served.url + "/tenants/acme/v1/completions",
            json=body | {"model": "base"},
            headers=bearer(globex),
        ),
        403,
    )
    assert "acme" in error["message"]
    # both tenants have a "py": each gets its own
    cases = [Case(t, "py", False, False, PROMPT) for t in ("acme", "globex")]
    got = [
        httpx.post(
            served.url + c.path, json=c.body(), headers=bearer(world["keys"][c.tenant]), timeout=60
        ).json()["choices"][0]["text"]
        for c in cases
    ]
    want = [c.text for c in reference(cases)]
    assert got == want and got[0] != got[1]


def test_metrics_need_the_admin_key_and_move(served, world):
    def scrape() -> str:
        response = httpx.get(served.url + "/metrics", headers=bearer(ADMIN_KEY))
        assert response.status_code == 200, response.text
        return response.text

    def completions_ok(text: str) -> float:
        prefix = 'flora_requests_total{endpoint="completions",status="200",tenant="acme"} '
        lines = [line for line in text.splitlines() if line.startswith(prefix)]
        return float(lines[0].split()[-1]) if lines else 0.0

    before = scrape()
    response = httpx.post(
        served.url + "/tenants/acme/v1/completions",
        json={"model": "base", "prompt": "x", "max_tokens": 2},
        headers=bearer(world["keys"]["acme"]),
        timeout=60,
    )
    assert response.status_code == 200, response.text
    after = scrape()
    assert completions_ok(after) == completions_ok(before) + 1
    assert "flora_time_to_first_token_seconds_bucket" in after
    engine_lines = [line for line in after.splitlines() if line.startswith("flora_engine_total{")]
    assert any('what="steps"' in line for line in engine_lines), engine_lines
    error_of(httpx.get(served.url + "/metrics", headers=bearer(world["keys"]["acme"])), 403)
    error_of(httpx.get(served.url + "/metrics"), 401)


LONG = " ".join(str(i) for i in range(3000))  # well over the tiny model's 1024-token context


@pytest.mark.parametrize(
    ("key", "endpoint", "body", "status"),
    [
        ("acme", "completions", '{"model": "base", "prompt": ', 400),  # malformed JSON
        ("acme", "completions", {"model": "nope", "prompt": "x"}, 404),
        ("acme", "chat/completions", {"model": "nope", "messages": [{"role": "user"}]}, 400),
        ("acme", "completions", {"model": "nope", "prompt": "x", "stream": True}, 404),
        ("globex", "completions", {"model": "c", "prompt": "x"}, 404),  # acme's adapter
        (None, "completions", {"model": "base", "prompt": "x"}, 401),
        ("flr_wrong", "completions", {"model": "base", "prompt": "x"}, 401),
        (ADMIN_KEY, "completions", {"model": "base", "prompt": "x"}, 403),
        ("acme", "completions", {"model": "base", "prompt": LONG}, 400),
        ("acme", "chat/completions", {"messages": [{"role": "user", "content": LONG}]}, 400),
        ("acme", "completions", {"model": "base", "prompt": "x", "max_tokens": 10**9}, 400),
        ("acme", "completions", {"model": "base", "prompt": "x", "max_tokens": -1}, 400),
        ("acme", "completions", {"model": "base", "prompt": "x", "n": 2}, 400),
        ("acme", "chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 2}, 400),
    ],
    ids=[
        "malformed-json",
        "unknown-model",
        "chat-message-without-content",
        "unknown-model-streamed",
        "another-tenants-adapter",
        "missing-key",
        "wrong-key",
        "admin-key",
        "prompt-over-context",
        "chat-over-context",
        "max-tokens-huge",
        "max-tokens-negative",
        "n-2",
        "chat-n-2",
    ],
)
def test_bad_requests_get_openai_shaped_4xx_and_the_server_keeps_answering(
    served, world, key, endpoint, body, status
):
    keys = world["keys"]
    tenant = "globex" if key == "globex" else "acme"
    headers = bearer(keys.get(key, key))
    url = f"{served.url}/tenants/{tenant}/v1/{endpoint}"
    if isinstance(body, str):
        headers["Content-Type"] = "application/json"
        response = httpx.post(url, content=body, headers=headers, timeout=60)
    else:
        response = httpx.post(url, json=body, headers=headers, timeout=60)
    error_of(response, status)
    ok = httpx.post(
        f"{served.url}/tenants/acme/v1/completions",
        json={"prompt": "x", "max_tokens": 1},
        headers=bearer(keys["acme"]),
        timeout=60,
    )
    assert ok.status_code == 200, ok.text
