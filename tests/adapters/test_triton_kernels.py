"""The Triton paths equal the float64 materialised reference, on fresh random inputs.

On CUDA the kernels run compiled; elsewhere on CPU under Triton's interpreter, with
``TRITON_INTERPRET=1`` set per test, so other tests' CPU dispatchers never see the Triton paths
(``triton_interpreter.py``; in a full run the module reruns in a fresh interpreter). Shapes are
small: the interpreter runs each program in NumPy.
"""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from flora.adapters import AdaptedLinear, AdapterBatch, AdapterKind, BankConfig, KernelPath
from flora.adapters.calibration import Calibration, DeviceProfile, GemmCurve
from flora.adapters.dispatch import CostModel, Dispatcher, Workload, kind_paths
from flora.adapters.reference import reference_forward
from flora.adapters.triton_kernels import flora_triton, triton_available
from flora.engine import EngineConfig
from tests.adapters.conftest import assert_matches, rand, random_flora, random_lora, rounded
from tests.adapters.triton_interpreter import prepare, rerun_fresh, skip_unless

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
READY = prepare(DEVICE)  # before anything else imports triton
pytest.importorskip("triton")
kernels = skip_unless(READY)
on_cpu = pytest.mark.skipif(DEVICE != "cpu", reason="checks the CPU interpreter's gating")

K, D, SLOTS, MAX_RANK = 48, 80, 6, 8  # non-power-of-two in/out; ranks below the table's R
RANKS = {"r1": [1], "mixed": [1, 2, 4, 3, 2]}  # the last slot stays empty (identity)
PATHS = {AdapterKind.FLORA: KernelPath.FLORA_TRITON, AdapterKind.LORA: KernelPath.LORA_BGMV_TRITON}
CPU = torch.device("cpu")


@pytest.fixture
def interpret(monkeypatch: pytest.MonkeyPatch) -> None:
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def layer_with(gen, kind: AdapterKind, ranks: list[int], dtype: torch.dtype, bias: bool):
    """A layer with ``ranks`` adapters of ``kind`` loaded (slot ``SLOTS - 1`` left empty)."""
    base = nn.Linear(K, D, bias=bias, dtype=dtype, device=DEVICE)
    with torch.no_grad():
        base.weight.copy_(rand(gen, D, K, scale=K**-0.5))
        if bias:
            base.bias.copy_(rand(gen, D))
    layer = AdaptedLinear(base, BankConfig(max_slots=SLOTS, max_rank=MAX_RANK))
    adapters = {}
    for slot, r in enumerate(ranks):
        make = random_flora if kind is AdapterKind.FLORA else random_lora
        adapters[slot] = make(gen, r, K, D)
        layer.load_adapter(slot, adapters[slot])
    return layer, adapters


def run_forced(layer, kind: AdapterKind, x: torch.Tensor, slots: list[int]) -> torch.Tensor:
    """The layer's output on the Triton path, on the kernels' device, back on the CPU."""
    batch = AdapterBatch.from_slots(slots, device=DEVICE)
    with torch.no_grad():
        return layer(x.to(DEVICE), batch, paths={kind: PATHS[kind]}).cpu()


def reference(layer, adapters, x: torch.Tensor, slots: list[int]) -> torch.Tensor:
    dtype, base = x.dtype, layer.base
    per_token = [rounded(adapters[s], dtype) if s in adapters else None for s in slots]
    bias = base.bias.cpu() if base.bias is not None else None
    return reference_forward(x, base.weight.cpu(), bias, per_token)


def check_path(gen, kind, dtype, tokens, bias, ranks):
    layer, adapters = layer_with(gen, kind, ranks, dtype, bias)
    slots = torch.randint(-1, SLOTS, (tokens,), generator=gen).tolist()
    slots[0] = -1  # the no-adapter entry is always in the batch
    if tokens > 1:
        slots[1] = 0  # and, with room, an adapter (else the layer skips the kind entirely)
    x = rand(gen, tokens, K).to(dtype)
    y = run_forced(layer, kind, x, slots)
    assert y.dtype == dtype and y.shape == (tokens, D)
    assert_matches(y, reference(layer, adapters, x, slots), dtype)


@kernels
@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("ranks", RANKS.values(), ids=RANKS.keys())
@pytest.mark.parametrize("tokens", [1, 7, 64])  # at 1, the no-adapter token alone
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", list(PATHS), ids=str)
def test_triton_path_matches_reference(gen, kind, dtype, tokens, ranks, bias):
    check_path(gen, kind, dtype, tokens, bias, ranks)


@kernels
@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize("kind", list(PATHS), ids=str)
def test_fp16(gen, kind):
    layer, adapters = layer_with(gen, kind, RANKS["mixed"], torch.float16, bias=True)
    slots = [-1, 0, 1, 2, 3, 4, 5, 2]
    x = rand(gen, len(slots), K).half()
    y = run_forced(layer, kind, x, slots)
    assert y.dtype == torch.float16
    assert_matches(y, reference(layer, adapters, x, slots), torch.bfloat16)  # fp16 is tighter


@kernels
@pytest.mark.usefixtures("interpret")
def test_with_autograd_the_flora_kernel_defers_to_the_differentiable_path(gen):
    layer, _ = layer_with(gen, AdapterKind.FLORA, [2, 3], torch.float32, bias=True)
    x = rand(gen, 5, K).float().to(DEVICE).requires_grad_()
    bank, base = layer.bank, layer.base
    entries = torch.tensor([0, 1, 2, 1, 0], device=DEVICE)
    y = flora_triton(x, base.weight, base.bias, bank.flora_A, bank.flora_Bt, entries, 3)
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@kernels
@on_cpu
def test_triton_paths_are_candidates_only_under_the_interpreter_on_cpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not triton_available(CPU)
    assert KernelPath.FLORA_TRITON not in kind_paths(AdapterKind.FLORA, CPU)
    assert KernelPath.LORA_BGMV_TRITON not in kind_paths(AdapterKind.LORA, CPU)
    assert KernelPath.LORA_BGMV_TRITON in kind_paths(AdapterKind.LORA)  # every path, no device
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_available(CPU)
    assert KernelPath.FLORA_TRITON in kind_paths(AdapterKind.FLORA, CPU)
    assert KernelPath.LORA_BGMV_TRITON in kind_paths(AdapterKind.LORA, CPU)
    assert kind_paths(AdapterKind.IA3, CPU) == (KernelPath.IA3,)


@kernels
@on_cpu
@pytest.mark.parametrize("interpreted", [False, True])
def test_dispatcher_weighs_the_triton_path_only_where_it_runs(gen, monkeypatch, interpreted):
    if interpreted:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    layer, _ = layer_with(gen, AdapterKind.FLORA, [2, 1], torch.float32, bias=True)
    measured: list[KernelPath] = []
    dispatcher = Dispatcher(Calibration(persist=False), tune_margin=1e9, tune_repeats=1)
    batch = AdapterBatch.from_slots([0, 1, -1, 0])
    workload = layer.workload(AdapterKind.FLORA, batch)

    def measure(path: KernelPath) -> float:
        measured.append(path)
        return 1.0

    dispatcher.choose(AdapterKind.FLORA, workload, CPU, torch.float32, measure)
    assert (KernelPath.FLORA_TRITON in measured) is interpreted
    assert KernelPath.FLORA_VECTORISED in measured


@kernels
@on_cpu
def test_a_forced_triton_path_that_cannot_run_fails_early_and_clearly(gen, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValidationError, match="TRITON_INTERPRET=1"):
        EngineConfig(device="cpu", adapter_paths={AdapterKind.FLORA: KernelPath.FLORA_TRITON})
    with pytest.raises(ValidationError, match="cannot run flora adapters"):
        EngineConfig(device="cpu", adapter_paths={AdapterKind.FLORA: KernelPath.LORA_BGMV_TRITON})
    layer, _ = layer_with(gen, AdapterKind.LORA, [2], torch.float32, bias=True)
    x = rand(gen, 2, K).float()
    with pytest.raises(ValueError, match="needs Triton"), torch.no_grad():
        layer(x, AdapterBatch.from_slots([0, -1]), paths=PATHS)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    config = EngineConfig(device="cpu", adapter_paths=PATHS)
    assert config.adapter_paths == PATHS


@kernels
@pytest.mark.skipif(DEVICE != "cuda", reason="needs CUDA")
def test_on_cuda_the_triton_paths_are_candidates():
    assert triton_available("cuda")
    assert KernelPath.FLORA_TRITON in kind_paths(AdapterKind.FLORA, torch.device("cuda"))


def test_cost_model_prices_the_fused_paths_below_their_pytorch_twins():
    # test_dispatch.py's device: a 2048→2304 GEMM costs 50 µs + 40 µs per row
    profile = DeviceProfile(op_seconds=5e-6, bytes_per_second=20e9, thin_flops_per_second=50e9)
    curve = GemmCurve((1, 8, 32, 128), tuple(50e-6 + 40e-6 * m for m in (1, 8, 32, 128)))
    model = CostModel(profile, curve, element_size=2)

    def workload(counts, ranks):
        n = len(counts)
        return Workload(2048, 2304, tuple(counts), tuple(ranks), n, max(counts), (False,) * n)

    rank_one = workload([2] * 32, [1] * 32)
    fused = model.cost(KernelPath.FLORA_TRITON, rank_one)
    assert fused < model.cost(KernelPath.FLORA_VECTORISED, rank_one)
    assert fused < 1.1 * model.cost(KernelPath.BASE, rank_one)
    mixed = workload([16, 16, 32], [0, 4, 8])  # the no-adapter slot first
    bgmv = model.cost(KernelPath.LORA_BGMV_TRITON, mixed)
    assert bgmv < model.cost(KernelPath.LORA_GATHER, mixed)
    base_only = workload([64], [0])
    assert model.cost(KernelPath.LORA_BGMV_TRITON, base_only) < 1.1 * model.cost(
        KernelPath.BASE, base_only
    )


@pytest.mark.skipif(READY, reason="the kernel tests ran in this process")
def test_in_a_fresh_interpreter():
    rerun_fresh(__file__)
