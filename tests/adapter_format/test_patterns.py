"""Tenant regexes run in linear time: the families that froze the server are answered at once,
patterns RE2 cannot run in linear time are refused with the reason, and ordinary PEFT keys
match exactly as Python's ``re`` (and so PEFT) matches them.

With the previous checks (Python ``re``, which these keys passed) one ``fullmatch`` against
``transformer.h.0.attn.c_attn`` took 20.6 s for ``.{0,9}`` × 12 then ``X``, about ×4 per group
(``scripts/regex_timing.py``; docs/benchmarks/logs/regex-timing.md).
"""

from __future__ import annotations

import json
import re
import time

import numpy as np
import pytest
import torch
from safetensors.numpy import save

from adapter_format import MODULES, AdapterConfig, AdapterFormatError
from adapter_format.patterns import matches_suffix, matches_whole
from adapter_registry import BaseModelCatalog
from adapter_registry.errors import InvalidAdapter
from adapter_registry.formats import validate_adapter
from flora.model import AdapterFileError, load_adapter_dir
from tests.adapter_format.conftest import ARGS, adapter_dir
from tests.adapter_registry.conftest import SPEC, adapter_config, adapter_tensors

FAMILIES = {  # family → grown until the old code took > 10 s, and on to the length cap
    "dot": [".{0,9}" * n + "X" for n in (12, 16, 24, 33)],
    "class": ["[^X]{0,9}" * n + "X" for n in (12, 16, 22)],
    "word": ["\\w{0,5}\\.?" * n + "X" for n in (16, 19)],
}
CASES = [(family, p) for family, patterns in FAMILIES.items() for p in patterns]
MODULE_NAMES = [f"transformer.h.{i}.{m}" for i in range(3) for m in MODULES]


def _fast(call) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


@pytest.mark.parametrize("field", ["rank_pattern", "alpha_pattern"])
@pytest.mark.parametrize("family, pattern", CASES, ids=[f"{f}-{len(p)}" for f, p in CASES])
def test_catastrophic_keys_are_answered_at_once(family, pattern, field, tmp_path):
    """Upload (registry) and load (engine) both finish within 100 ms; the key is a valid
    pattern that matches no module, so the adapter is accepted and served as ``r`` says."""
    assert len(pattern) <= 200
    config = adapter_config("lora", 2, **{field: {pattern: 4}})
    weights = adapter_tensors("lora", 2)
    catalog = BaseModelCatalog([SPEC])
    config_bytes, weight_bytes = json.dumps(config).encode(), save(weights)

    def upload() -> None:
        info = validate_adapter(config_bytes, weight_bytes, catalog, max_bytes=1 << 20)
        assert info.rank == 2

    assert _fast(upload) < 0.1
    directory = adapter_dir(tmp_path, config, weights)

    def load() -> None:
        assert load_adapter_dir(directory, ARGS).rank == 2

    assert _fast(load) < 0.1


@pytest.mark.parametrize("family, pattern", CASES, ids=[f"{f}-{len(p)}" for f, p in CASES])
def test_catastrophic_feedforward_regex_is_answered_at_once(family, pattern):
    """IA3's ``feedforward_modules`` string is a regex over whole module names."""
    config = AdapterConfig.from_dict(adapter_config("ia3", 1, feedforward_modules=pattern))
    assert _fast(lambda: [config.is_feedforward(m) for m in MODULE_NAMES]) < 0.1


@pytest.mark.parametrize(
    "pattern, reason",
    [
        (r"(a)\1", "invalid escape sequence"),  # a back-reference
        (r"(?=c_attn)", "invalid perl operator"),  # a look-ahead
        ("(a{0,100}){0,100}", "invalid repetition size"),
        (".{0,999}" * 25, "pattern too large"),  # 200 characters, a huge automaton
        ("k" * 201, "the limit is 200"),
        ("[", "missing ]"),
    ],
)
def test_patterns_that_cannot_run_in_linear_time_are_refused(pattern, reason, tmp_path):
    config = adapter_config("lora", 2, rank_pattern={pattern: 4})
    weights = adapter_tensors("lora", 2)
    started = time.perf_counter()
    with pytest.raises(InvalidAdapter, match=re.escape(reason)) as upload:
        validate_adapter(
            json.dumps(config).encode(), save(weights), BaseModelCatalog([SPEC]), max_bytes=1 << 20
        )
    assert time.perf_counter() - started < 0.1
    assert upload.value.status == 422 and len(upload.value.message) < 400
    with pytest.raises(AdapterFileError) as load:  # the engine gives the same verdict
        load_adapter_dir(adapter_dir(tmp_path, config, weights), ARGS)
    assert str(load.value) == upload.value.message


PEFT_KEYS = [
    "c_attn",
    "attn.c_attn",
    "transformer.h.1.attn.c_attn",
    r"h\.1\.attn\.c_attn",
    r"h\.[02]\..*",
    "c_proj",
    "mlp.c_proj",
    r"attn\.c_(attn|proj)",
    ".*c_fc",
    "c_attn|c_fc",
    "h.1",
    "nothing",
]


@pytest.mark.parametrize("key", PEFT_KEYS)
def test_ordinary_keys_match_as_python_re_does(key):
    """PEFT's ``get_pattern_key``: ``re.match(rf"(.*\\.)?({key})$", name)``."""
    for name in MODULE_NAMES:
        want = re.match(rf"(.*\.)?({key})$", name) is not None
        assert matches_suffix(key, name, "rank_pattern") is want, (key, name)
        whole = re.fullmatch(key, name) is not None
        assert matches_whole(key, name, "feedforward_modules") is whole, (key, name)


def test_rank_pattern_still_selects_ranks(tmp_path):
    """A real override: layer 1's c_attn at rank 4, layer 0 at ``r``; both sides agree."""
    weights = adapter_tensors("lora", 2)
    rng = np.random.default_rng(1)
    n_in, n_out = SPEC.module_shape("attn.c_attn")
    prefix = "base_model.model.transformer.h.1.attn.c_attn"
    weights[f"{prefix}.lora_A.weight"] = rng.standard_normal((4, n_in)).astype(np.float32)
    weights[f"{prefix}.lora_B.weight"] = rng.standard_normal((n_out, 4)).astype(np.float32)
    config = adapter_config("lora", 2, rank_pattern={r"h\.1\.attn\.c_attn": 4})
    info = validate_adapter(
        json.dumps(config).encode(), save(weights), BaseModelCatalog([SPEC]), max_bytes=1 << 20
    )
    loaded = load_adapter_dir(adapter_dir(tmp_path, config, weights), ARGS)
    assert info.rank == loaded.rank == 4
    assert loaded.layers["transformer.h.0.attn.c_attn"].rank == 2
    assert loaded.layers["transformer.h.1.attn.c_attn"].A.dtype == torch.float32


def test_a_key_cannot_escape_its_group():
    """PEFT interpolates the key into ``(.*\\.)?(key)$``; an unbalanced key is refused alone
    rather than changing the wrapper's meaning."""
    with pytest.raises(AdapterFormatError, match="not a pattern"):
        AdapterConfig.from_dict(adapter_config("lora", 2, rank_pattern={"a)|(.*": 4}))
