"""A hostile tenant against `serve run` (real Ray proxy, ingress and replica processes): the
attacks of issue 14 change nothing for a bystander tenant.

The server runs the demo YAML with one change: ``engine.max_adapter_magnitude`` raised to
3e38, as an operator who turned the upload guard off would, so adapters that overflow reach the
engine and the runtime containment is what is tested (with the default, the registry refuses
them at upload: tests/adapter_format and tests/serve cover that). Throughout, a bystander's
greedy tokens equal its solo run byte for byte, and ``/healthz`` answers within a second.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
import torch
import yaml

from adapter_registry.client import RegistryClient
from flora.adapters import AdapterKind, FloraWeights, LoraWeights
from flora.model import ModelArgs, save_adapter_dir
from tests.e2e.conftest import ADMIN_KEY, CONFIG, ServeRun
from tests.serve.conftest import random_adapter_dir

MODEL = "flora/tiny"
PROMPT = "def fibonacci(n):\n    "
STEPS = 40  # long enough for the attacks to land while the bystander decodes
CATASTROPHIC = ".{0,9}" * 12 + "X"  # 20 s per match with Python's re (tests/adapter_format)


class Healthz:
    """Polls ``/healthz`` every 50 ms on its own thread; remembers the slowest answer."""

    def __init__(self, url: str):
        self.url, self.slowest, self.failures = url, 0.0, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=10) as client:
            while not self._stop.is_set():
                started = time.perf_counter()
                try:
                    ok = client.get(self.url + "/healthz").status_code == 200
                except httpx.HTTPError as e:
                    ok = False
                    self.failures.append(repr(e))
                self.slowest = max(self.slowest, time.perf_counter() - started)
                if not ok:
                    self.failures.append("not 200")
                time.sleep(0.05)

    def __enter__(self) -> Healthz:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        assert not self.failures and self.slowest < 1.0, (self.slowest, self.failures[:3])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeRun]:
    workdir = tmp_path_factory.mktemp("hostile")
    config = yaml.safe_load(CONFIG.read_text())
    config["applications"][0]["args"]["engine"]["max_adapter_magnitude"] = 3.0e38
    path = workdir / "guard-off.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    cache = os.environ.get("FLORA_CACHE_DIR")
    cache_dir = Path(cache) if cache else tmp_path_factory.mktemp("flora-cache")
    run = ServeRun(workdir, cache_dir, config=path).start()
    yield run
    left = run.stop()
    assert not left, f"Ray processes outlived `serve run`: {left}"


@pytest.fixture(scope="module")
def world(server: ServeRun, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Tenants ``victim`` (a benign FLoRA adapter ``mine``) and ``attacker`` (adapters that
    overflow: a LoRA with B = 1e37 and a FLoRA with factors of 1e18)."""
    root = tmp_path_factory.mktemp("hostile-adapters")
    args = ModelArgs.from_dir(server.model_dir)
    with RegistryClient(server.url, ADMIN_KEY) as admin:
        keys = {t: admin.create_tenant(t)[1] for t in ("victim", "attacker")}
    benign = random_adapter_dir(root / "mine", AdapterKind.FLORA, 2, 7, args, MODEL)
    qkv = args.n_embd + 2 * args.head_dim
    layers_lora, layers_flora = {}, {}
    for i in range(args.n_layer):
        module = f"transformer.h.{i}.attn.c_attn"
        layers_lora[module] = LoraWeights(torch.ones(1, args.n_embd), torch.full((qkv, 1), 1e37), 1)
        layers_flora[module] = FloraWeights(
            torch.full((1, args.n_embd), 1e18), torch.full((qkv, 1), 1e18)
        )
    lora = save_adapter_dir(root / "boom-lora", AdapterKind.LORA, layers_lora, base_model=MODEL)
    flora = save_adapter_dir(root / "boom-flora", AdapterKind.FLORA, layers_flora, base_model=MODEL)
    with RegistryClient(server.url, keys["victim"]) as victim:
        victim.register(benign, "mine")
    with RegistryClient(server.url, keys["attacker"]) as attacker:
        attacker.register(lora, "boom-lora")
        attacker.register(flora, "boom-flora")
    return {"keys": keys, "root": root, "args": args}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def body(model: str, prompt: str = PROMPT, **extra) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": STEPS, "temperature": 0} | extra


async def stream(client: httpx.AsyncClient, key: str, payload: dict) -> dict:
    """A streamed completion: its text, token logprobs and when it ended."""
    payload = payload | {"stream": True, "logprobs": 2}
    text, logprobs = "", []
    async with client.stream("POST", "/v1/completions", json=payload, headers=bearer(key)) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])  # strict JSON: a NaN would not parse back as a number
            assert "error" not in chunk, chunk
            choice = chunk["choices"][0]
            text += choice["text"]
            logprobs += choice["logprobs"]["token_logprobs"]
    return {"text": text, "logprobs": logprobs, "ended": time.monotonic()}


def assert_same(got: dict, solo: dict) -> None:
    assert got["text"] == solo["text"]  # byte for byte
    assert all(math.isfinite(v) for v in got["logprobs"])
    assert got["logprobs"] == pytest.approx(solo["logprobs"], rel=1e-3, abs=1e-3)


async def attack(client: httpx.AsyncClient, key: str, model: str, until: asyncio.Event) -> list:
    """Hostile requests back to back until the bystander is done; returns their answers."""
    answers = []
    while not until.is_set() or not answers:
        r = await client.post("/v1/completions", json=body(model), headers=bearer(key))
        answers.append((r.status_code, r.json(), time.monotonic()))
    return answers


def test_poisoned_adapters_fail_alone_and_leave_nothing_behind(server, world):
    keys = world["keys"]

    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            solo = {m: await stream(client, keys["victim"], body(m)) for m in ("base", "mine")}
            done = asyncio.Event()

            async def bystanders() -> list[dict]:
                runs = await asyncio.gather(
                    *(stream(client, keys["victim"], body(m)) for m in ("base", "mine") * 2)
                )
                done.set()
                return runs

            runs, *attacks = await asyncio.gather(
                bystanders(),
                attack(client, keys["attacker"], "boom-lora", done),
                attack(client, keys["attacker"], "boom-flora", done),
            )
            for i, run in enumerate(runs):
                assert_same(run, solo[("base", "mine")[i % 2]])
            answers = [a for per_model in attacks for a in per_model]
            first_end = min(r["ended"] for r in runs)
            assert any(t < first_end for _, _, t in answers), "no attack overlapped the batch"
            for status, reply, _ in answers:
                assert status == 422, reply
                assert reply["error"]["code"] == "adapter_numerical_error"
                assert "non-finite" in reply["error"]["message"]
            # after the attack: new sequences take the freed KV blocks
            after = await asyncio.gather(
                *(stream(client, keys["victim"], body(m)) for m in ("base", "mine") * 4)
            )
            for i, run in enumerate(after):
                assert_same(run, solo[("base", "mine")[i % 2]])

    with Healthz(server.url):
        asyncio.run(scenario())


def test_a_streamed_attack_ends_in_an_error_event_not_a_crash(server, world):
    payload = body("boom-lora") | {"stream": True}
    with httpx.Client(base_url=server.url, timeout=60) as client:
        r = client.post("/v1/completions", json=payload, headers=bearer(world["keys"]["attacker"]))
    # the failure comes at the first step, before any token: a plain 422, as OpenAI answers
    assert r.status_code == 422 and r.json()["error"]["code"] == "adapter_numerical_error"


def test_catastrophic_patterns_freeze_nothing(server, world):
    """The key that held the GIL for 20 s is accepted at once (a valid pattern matching no
    module) and served at once; the server stays responsive and the bystander unchanged."""
    args, keys = world["args"], world["keys"]
    directory = random_adapter_dir(world["root"] / "regex", AdapterKind.LORA, 2, 9, args, MODEL)
    config = json.loads((directory / "adapter_config.json").read_text())
    config |= {"rank_pattern": {CATASTROPHIC: 4}, "alpha_pattern": {CATASTROPHIC: 8.0}}
    (directory / "adapter_config.json").write_text(json.dumps(config))

    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            solo = await stream(client, keys["victim"], body("base"))
            started = time.perf_counter()
            with RegistryClient(server.url, keys["attacker"]) as attacker:
                record = await asyncio.to_thread(attacker.register, directory, "regex")
            assert record.rank == 2 and time.perf_counter() - started < 5
            bystander, used = await asyncio.gather(
                stream(client, keys["victim"], body("base")),
                client.post(
                    "/v1/completions", json=body("regex"), headers=bearer(keys["attacker"])
                ),
            )
            assert used.status_code == 200, used.text
            assert_same(bystander, solo)

    with Healthz(server.url):
        asyncio.run(scenario())


@pytest.mark.parametrize(
    "field, value, code, words",
    [
        ("r", 32, 422, "max_rank 16"),
        ("alpha_pattern", {"c_attn": "abc"}, 422, "must be a finite number"),
        ("lora_alpha", 1e308, 422, "must be a finite number"),
    ],
)
def test_unservable_adapters_are_refused_at_upload(server, world, field, value, code, words):
    args = world["args"]
    rank = value if field == "r" else 2
    directory = random_adapter_dir(
        world["root"] / f"bad-{field}", AdapterKind.LORA, rank, 3, args, MODEL
    )
    config = json.loads((directory / "adapter_config.json").read_text()) | {field: value}
    files = {
        "config": ("adapter_config.json", json.dumps(config).encode()),
        "weights": (
            "adapter_model.safetensors",
            (directory / "adapter_model.safetensors").read_bytes(),
        ),
    }
    r = httpx.post(
        server.url + "/v1/adapters",
        data={"name": f"bad-{field.replace('_', '-')}"},
        files=files,
        headers=bearer(world["keys"]["attacker"]),
        timeout=60,
    )
    assert r.status_code == code, r.text
    assert words in r.json()["error"]["message"]


@pytest.mark.parametrize("model", ["mine@²", "mine@𝟙", "mine@1²"])
def test_non_ascii_versions_are_a_400(server, world, model):
    r = httpx.post(
        server.url + "/v1/completions",
        json=body(model),
        headers=bearer(world["keys"]["victim"]),
        timeout=60,
    )
    assert r.status_code == 400, r.text


def replica_process(server: ServeRun) -> psutil.Process:
    found = [
        p
        for p in server.session_processes()
        if "StarCoderReplica" in " ".join(p.cmdline()) and "Serve" in " ".join(p.cmdline())
    ]
    assert len(found) == 1, [" ".join(p.cmdline())[:100] for p in server.session_processes()]
    return found[0]


def test_readyz_fails_while_the_only_replica_is_frozen(server, world):
    """SIGSTOP the replica's process: /readyz turns 503 and says why, /healthz stays fast;
    after SIGCONT it is ready again and serves."""
    replica = replica_process(server)
    assert httpx.get(server.url + "/readyz", timeout=30).status_code == 200
    with Healthz(server.url):
        replica.send_signal(signal.SIGSTOP)
        try:
            deadline, status = time.monotonic() + 30, 200
            while time.monotonic() < deadline and status == 200:
                ready = httpx.get(server.url + "/readyz", timeout=30)
                status = ready.status_code
                time.sleep(0.5)
            assert status == 503, ready.text
            assert "replica" in ready.text
        finally:
            replica.send_signal(signal.SIGCONT)
    deadline = time.monotonic() + 60
    while httpx.get(server.url + "/readyz", timeout=30).status_code != 200:
        assert time.monotonic() < deadline, "not ready again after SIGCONT"
        time.sleep(0.5)
    r = httpx.post(
        server.url + "/v1/completions",
        json=body("base"),
        headers=bearer(world["keys"]["victim"]),
        timeout=60,
    )
    assert r.status_code == 200
