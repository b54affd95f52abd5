"""The dispatcher's cost model: sensible choices on known constants, and a real calibration."""

from __future__ import annotations

import json

import torch

from flora.adapters import AdapterBatch, AdapterKind, KernelPath
from flora.adapters.calibration import Calibration, DeviceProfile, GemmCurve
from flora.adapters.dispatch import PATHS_BY_KIND, CostModel, Workload
from tests.adapters.conftest import make_layer, random_flora, random_lora

# A device where a [m, 2048] x [2048, 2304] GEMM costs 50 µs + 40 µs per row.
PROFILE = DeviceProfile(op_seconds=5e-6, bytes_per_second=20e9, thin_flops_per_second=50e9)
CURVE = GemmCurve((1, 8, 32, 128), tuple(50e-6 + 40e-6 * m for m in (1, 8, 32, 128)))
MODEL = CostModel(PROFILE, CURVE, element_size=2)


def workload(counts, ranks, cached=None):
    return Workload(
        in_features=2048,
        out_features=2304,
        counts=tuple(counts),
        ranks=tuple(ranks),
        runs=len(counts),
        longest_run=max(counts),
        cached=tuple(cached or [False] * len(counts)),
    )


def best(kind, w):
    return min(PATHS_BY_KIND[kind], key=lambda p: MODEL.cost(p, w))


def test_rank_one_many_adapters_prefers_vectorised_flora():
    assert best(AdapterKind.FLORA, workload([2] * 32, [1] * 32)) is KernelPath.FLORA_VECTORISED


def test_high_rank_one_hot_cached_adapter_prefers_segmented_flora():
    w = workload([64], [32], cached=[True])
    assert best(AdapterKind.FLORA, w) is KernelPath.FLORA_SEGMENTED
    assert (
        MODEL.cost(KernelPath.FLORA_SEGMENTED, w) < MODEL.cost(KernelPath.FLORA_VECTORISED, w) / 8
    )


def test_costs_grow_with_rank_and_cold_materialisation_costs_more():
    w1, w16 = workload([8] * 8, [1] * 8), workload([8] * 8, [16] * 8)
    for path in (
        KernelPath.FLORA_VECTORISED,
        KernelPath.LORA_GATHER,
        KernelPath.LORA_STACKED,
        KernelPath.LORA_BMM,
    ):
        assert MODEL.cost(path, w16) > MODEL.cost(path, w1)
    cold, hot = workload([8] * 8, [16] * 8), workload([8] * 8, [16] * 8, cached=[True] * 8)
    assert MODEL.cost(KernelPath.FLORA_SEGMENTED, cold) > MODEL.cost(
        KernelPath.FLORA_SEGMENTED, hot
    )


def test_flora_rank_one_costs_about_one_base_gemm():
    w = workload([2] * 32, [1] * 32)
    assert MODEL.cost(KernelPath.FLORA_VECTORISED, w) < 1.1 * MODEL.cost(KernelPath.BASE, w)


def test_gemm_curve_interpolates_and_extrapolates():
    assert CURVE(1) == CURVE(0.5)
    assert abs(CURVE(20) - (50e-6 + 800e-6)) < 1e-12
    assert abs(CURVE(512) - (50e-6 + 20480e-6)) < 1e-12


def test_real_calibration_is_positive_and_persisted(tmp_path, monkeypatch, gen):
    monkeypatch.setenv("FLORA_CACHE_DIR", str(tmp_path))
    calibration = Calibration()
    profile = calibration.profile(torch.device("cpu"), torch.float32)
    assert profile.op_seconds > 0 and profile.bytes_per_second > 0
    assert profile.thin_flops_per_second > 0
    stored = json.loads((tmp_path / "calibration.json").read_text())
    assert any("float32" in key for key in stored)
    again = Calibration().profile(torch.device("cpu"), torch.float32)  # read back from disk
    assert again == profile


def test_layer_plan_names_a_valid_path_per_kind(gen):
    layer = make_layer(gen, 32, 24, torch.float32)
    layer.load_adapter(0, random_flora(gen, 2, 32, 24))
    layer.load_adapter(1, random_lora(gen, 4, 32, 24))
    plan = layer.plan(AdapterBatch.from_slots([0, 1, -1, 0, 1]))
    assert set(plan) == {AdapterKind.FLORA, AdapterKind.LORA}
    for kind, path in plan.items():
        assert path in PATHS_BY_KIND[kind]
