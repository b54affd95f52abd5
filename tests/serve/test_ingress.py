"""The OpenAI-compatible API over a real engine and registry (in-process, real HTTP).

Outputs are checked against the engine called directly with the same adapter files; tenants are
isolated on every route; bad input gets OpenAI-shaped 4xx and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import openai
import pytest

from adapter_registry.client import RegistryClient
from flora.adapters import AdapterKind
from flora.engine import LLM, EngineConfig, SamplingParams
from flora.serve.config import LimitsConfig
from tests.serve.conftest import ADMIN_KEY, MODEL_NAME, Stack, random_adapter_dir

PROMPT = "def add(a, b):"


@pytest.fixture(scope="module")
def world(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two tenants with adapters: acme has py (FLoRA), c (LoRA) and ann's IA3; globex has py."""
    root = tmp_path_factory.mktemp("adapters")
    args = stack.model_args
    dirs = {
        "acme/py": random_adapter_dir(root / "acme-py", AdapterKind.FLORA, 2, 1, args),
        "acme/c": random_adapter_dir(root / "acme-c", AdapterKind.LORA, 4, 2, args),
        "acme/ann": random_adapter_dir(root / "acme-ann", AdapterKind.IA3, 1, 3, args),
        "globex/py": random_adapter_dir(root / "globex-py", AdapterKind.FLORA, 1, 4, args),
    }
    with stack.client(ADMIN_KEY) as admin:
        keys = {name: admin.create_tenant(name)[1] for name in ("acme", "globex")}
    with stack.client(keys["acme"]) as acme, stack.client(keys["globex"]) as globex:
        acme.register(dirs["acme/py"], "py", language="python")
        acme.register(dirs["acme/c"], "c", language="c")
        acme.register(dirs["acme/ann"], "ann", user="ann")
        globex.register(dirs["globex/py"], "py", language="python")
    return {"keys": keys, "dirs": dirs}


def direct(model_dir: Path, adapter_dir: Path | None, prompt: str, max_tokens: int) -> str:
    """The engine called directly: the reference for what the API must return."""
    llm = LLM(
        model_dir,
        EngineConfig(block_size=8, max_rank=8),
        adapters={"x": adapter_dir} if adapter_dir else None,
    )
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    return llm.generate([prompt], params, adapter="x" if adapter_dir else None)[0].text


def post(stack: Stack, key: str | None, path: str, body: dict | str) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, str):
        headers["Content-Type"] = "application/json"
        return httpx.post(stack.url + path, content=body, headers=headers, timeout=60)
    return httpx.post(stack.url + path, json=body, headers=headers, timeout=60)


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "code", "param"} and error["message"]
    return error


def test_completions_equal_the_engine_called_directly(stack, world, micro_dir):
    key = world["keys"]["acme"]
    dirs = world["dirs"]
    cases = [("base", None), ("py", dirs["acme/py"]), ("c@1", dirs["acme/c"])]
    for model, adapter_dir in [*cases, ("base:py", dirs["acme/py"])]:
        body = {"model": model, "prompt": PROMPT, "max_tokens": 6, "temperature": 0}
        response = post(stack, key, "/v1/completions", body)
        assert response.status_code == 200, response.text
        data = response.json()
        assert data["choices"][0]["text"] == direct(micro_dir, adapter_dir, PROMPT, 6), model
        assert data["usage"]["completion_tokens"] == 6
        assert data["usage"]["total_tokens"] == data["usage"]["prompt_tokens"] + 6
        expected = "base" if adapter_dir is None else model.removeprefix("base:").split("@")[0]
        assert response.headers["x-flora-adapter"].split("@")[0] == expected


def test_streaming_equals_non_streaming_and_ends_with_done(stack, world):
    key = world["keys"]["acme"]
    body = {"model": "py", "prompt": PROMPT, "max_tokens": 6, "temperature": 0}
    whole = post(stack, key, "/v1/completions", body).json()
    with httpx.stream(
        "POST",
        stack.url + "/v1/completions",
        json=body | {"stream": True},
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"] == whole["usage"]


def test_the_official_openai_client_works_unmodified(stack, world):
    client = openai.OpenAI(base_url=stack.url + "/v1", api_key=world["keys"]["acme"])
    completion = client.completions.create(model="py", prompt=PROMPT, max_tokens=5, temperature=0)
    assert completion.usage.completion_tokens == 5 and completion.choices[0].text
    chat = client.chat.completions.create(
        model="py",
        messages=[{"role": "user", "content": "Write a Python function."}],
        max_tokens=5,
        temperature=0,
    )
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens <= 5
    streamed = client.chat.completions.create(
        model="py",
        messages=[{"role": "user", "content": "Write a Python function."}],
        max_tokens=5,
        temperature=0,
        stream=True,
    )
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == chat.choices[0].message.content
    models = {m.id for m in client.models.list()}
    assert {MODEL_NAME, "base", "py", "c", "ann"} <= models
    tenant_client = openai.OpenAI(
        base_url=stack.url + "/tenants/acme/v1", api_key=world["keys"]["acme"]
    )
    again = tenant_client.completions.create(model="py", prompt=PROMPT, max_tokens=5, temperature=0)
    assert again.choices[0].text == completion.choices[0].text


def test_language_and_user_select_adapters(stack, world):
    key = world["keys"]["acme"]
    cases = [
        ({"prompt": "#!/usr/bin/env python3\nimport os"}, "py@1", "language"),
        ({"prompt": "int main() {", "language": "c"}, "c@1", "language"),
        ({"prompt": "<filename>x.c\nint f;"}, "c@1", "language"),
        ({"prompt": "SELECT 1;", "user": "ann"}, "ann@1", "user"),
        ({"prompt": "hello"}, "base", None),
    ]
    for extra, adapter, rule in cases:
        body = {"model": MODEL_NAME, "max_tokens": 2, "temperature": 0} | extra
        response = post(stack, key, "/v1/completions", body)
        assert response.status_code == 200, response.text
        assert response.headers["x-flora-adapter"] == adapter, extra
        if rule:
            assert response.headers["x-flora-adapter-reason"].startswith(adapter)


def test_tenants_cannot_use_or_see_each_others_adapters(stack, world, micro_dir):
    globex = world["keys"]["globex"]
    # globex's own "py" serves globex, never acme's
    body = {"model": "py", "prompt": PROMPT, "max_tokens": 6, "temperature": 0, "logprobs": 0}
    theirs = post(stack, globex, "/v1/completions", body).json()["choices"][0]
    mine = post(stack, world["keys"]["acme"], "/v1/completions", body).json()["choices"][0]
    assert theirs["text"] == direct(micro_dir, world["dirs"]["globex/py"], PROMPT, 6)
    assert theirs["logprobs"]["token_logprobs"] != mine["logprobs"]["token_logprobs"]
    for model in ("c", "c@1", "ann", "base:c"):
        error = error_of(post(stack, globex, "/v1/completions", body | {"model": model}), 404)
        assert error["code"] == "not_found" and error["param"] == "model"
    listed = httpx.get(
        stack.url + "/v1/models", headers={"Authorization": f"Bearer {globex}"}
    ).json()
    assert {m["id"] for m in listed["data"]} == {MODEL_NAME, "base", "py"}
    # a key used on another tenant's path
    error = error_of(post(stack, globex, "/tenants/acme/v1/completions", body), 403)
    assert "acme" in error["message"]


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ('{"model": "base", "prompt": ', 400),  # malformed JSON
        ({"model": "nope", "prompt": "x"}, 404),
        ({"model": "base", "prompt": "x", "max_tokens": -1}, 400),
        ({"model": "base", "prompt": "x", "max_tokens": 10**9}, 400),
        ({"model": "base", "prompt": "x", "n": 2}, 400),
        ({"model": "base", "prompt": ""}, 400),
        ({"model": "base", "prompt": ["a", "b"]}, 400),
        ({"model": "base", "prompt": "x", "temperature": 9}, 400),
        ({"model": "base", "prompt": "x " * 2000}, 400),  # over the context
        ({"model": "base", "prompt": [10**9]}, 400),  # token id outside the vocabulary
        ({"model": "base", "prompt": "x", "user": "bad/user"}, 400),
        ({"model": "base", "prompt": "x", "language": "../etc"}, 400),
        ({"prompt": "x", "model": "a" * 300}, 404),
    ],
)
def test_bad_requests_get_openai_shaped_4xx_and_the_server_survives(stack, world, body, status):
    error_of(post(stack, world["keys"]["acme"], "/v1/completions", body), status)
    ok = post(stack, world["keys"]["acme"], "/v1/completions", {"prompt": "x", "max_tokens": 1})
    assert ok.status_code == 200


def test_keys(stack, world):
    body = {"model": "base", "prompt": "x", "max_tokens": 1}
    assert (
        error_of(post(stack, None, "/v1/completions", body), 401)["type"] == "authentication_error"
    )
    error_of(post(stack, "flr_wrong", "/v1/completions", body), 401)
    error_of(post(stack, ADMIN_KEY, "/v1/completions", body), 403)


def test_the_openapi_spec_declares_what_the_routes_answer(stack):
    """Refusals, streamed events and the metrics' text are in the spec (schemathesis checks it)."""
    paths = httpx.get(stack.url + "/openapi.json").json()["paths"]
    for route in ("/v1/completions", "/v1/chat/completions", "/tenants/{tenant}/v1/completions"):
        answers = paths[route]["post"]["responses"]
        assert {"400", "401", "403", "404", "413", "422", "429"} <= answers.keys()
        assert "text/event-stream" in answers["200"]["content"]
    assert {"401", "403"} <= paths["/v1/models"]["get"]["responses"].keys()
    assert "text/plain" in paths["/metrics"]["get"]["responses"]["200"]["content"]
    assert "503" in paths["/readyz"]["get"]["responses"]


def test_metrics_need_the_admin_key_and_move(stack, world):
    def scrape() -> str:
        response = httpx.get(
            stack.url + "/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
        )
        assert response.status_code == 200
        return response.text

    def completions_ok(text: str) -> float:
        prefix = 'flora_requests_total{endpoint="completions",status="200",tenant="acme"} '
        lines = [line for line in text.splitlines() if line.startswith(prefix)]
        return float(lines[0].split()[-1]) if lines else 0.0

    before = completions_ok(scrape())
    post(stack, world["keys"]["acme"], "/v1/completions", {"prompt": "x", "max_tokens": 2})
    after = scrape()
    assert completions_ok(after) == before + 1
    assert "flora_time_to_first_token_seconds_bucket" in after
    assert "flora_engine_total{replica=" in after and 'what="steps"' in after
    tenant = world["keys"]["acme"]
    error_of(httpx.get(stack.url + "/metrics", headers={"Authorization": f"Bearer {tenant}"}), 403)


def test_a_client_that_leaves_a_stream_frees_its_request(stack, world):
    key = world["keys"]["acme"]
    body = {"model": "py", "prompt": PROMPT, "max_tokens": 200, "stream": True, "temperature": 0}
    headers = {"Authorization": f"Bearer {key}"}
    url = stack.url + "/v1/completions"
    with httpx.stream("POST", url, json=body, headers=headers, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                break  # one event, then hang up
    deadline = time.monotonic() + 10
    while (stats := asyncio.run(stack.core.engine.stats()))["running"] or stats["waiting"]:
        assert time.monotonic() < deadline, "the abandoned request is still in the engine"
        time.sleep(0.05)


def test_rate_limits_answer_429_with_retry_after(tmp_path, micro_dir):
    limited = Stack(
        tmp_path, micro_dir, LimitsConfig(requests_per_second=0.01, burst=2, max_concurrent=8)
    )
    try:
        with RegistryClient(limited.url, ADMIN_KEY) as admin:
            _, key = admin.create_tenant("acme")
        body = {"model": "base", "prompt": "x", "max_tokens": 1}
        statuses = [post(limited, key, "/v1/completions", body).status_code for _ in range(3)]
        assert statuses == [200, 200, 429]
        refused = post(limited, key, "/v1/completions", body)
        assert error_of(refused, 429)["type"] == "rate_limit_error"
        assert int(refused.headers["Retry-After"]) >= 1
    finally:
        limited.close()
