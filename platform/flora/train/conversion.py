"""LoRA → FLoRA conversion: fit FLoRA factors whose adapted weight best matches a LoRA's.

LoRA adapts a layer additively, ``T = W0 + ΔW`` with ``ΔW = scale · B_l A_l``; FLoRA
multiplicatively, ``W0 ∘ M`` with ``M = B A / r`` (``A [r, in]``, ``B [out, r]``). Conversion
solves the weighted low-rank problem

    min_{A, B}  f(A, B) = Σ_ij w_ij (W0_ij · M_ij − T_ij)²,   M = B A / r.

With ``w = 1`` this is ‖W0 ∘ M − T‖_F², i.e. a low-rank fit of M to ``T / W0`` with weights
``W0²`` — solved without ever dividing by ``W0`` (exact zeros in the base stay harmless). With
``w_ij = s_j`` (the mean of ``x_j²`` over calibration inputs) it approximates the output error
``‖X (W0 ∘ M − T)ᵀ‖²`` by the diagonal of ``XᵀX``, spending the rank where inputs are large.

Fidelity is bounded by the model class, not the solver: ``W0 ∘ M`` with rank-r ``M`` spans r
diagonally rescaled copies of ``W0``, while a LoRA delta is low-rank in the *additive* sense,
so ``ΔW / W0`` is generally full-rank. Expect a partial fit unless the rank is large or the
LoRA delta happens to be FLoRA-shaped; :func:`relative_weight_error` says how partial.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from flora.adapters import AdaptedLinear, AdapterBatch, BankConfig, FloraWeights, LoraWeights
from flora.adapters.weights import AdapterKind
from flora.model.attention import dense_attention
from flora.model.model import GPTBigCode

DEFAULT_ITERS = 100
DEFAULT_TOL = 1e-8
RIDGE = 1e-10  # proximal weight, relative to each r×r system's mean diagonal
INIT_NOISE = 0.1  # spread of the identity init's extra rank components (M stays exactly 1)
WEIGHT_FLOOR = 1e-6  # activation weights below this fraction of their mean are raised to it


# --- the fit -----------------------------------------------------------------------------


def weighted_objective(
    W0: torch.Tensor, target: torch.Tensor, M: torch.Tensor, weights: torch.Tensor | None = None
) -> float:
    """``Σ_ij w_ij (W0_ij M_ij − T_ij)²`` in float64 (``weights`` broadcasts to ``[out, in]``)."""
    residual = W0.double() * M.double() - target.double()
    sq = residual.square() if weights is None else weights.double() * residual.square()
    return float(sq.sum())


def _solve_rows(
    C: torch.Tensor, D: torch.Tensor, F_: torch.Tensor, X_prev: torch.Tensor, ridge: float = RIDGE
) -> torch.Tensor:
    """Row-wise weighted least squares: for each row i, ``x_i`` minimising
    ``Σ_j C_ij (x_i · f_j)² − 2 D_ij (x_i · f_j) + λ_i ‖x_i − x_i^prev‖²``, i.e.

        (Σ_j C_ij f_j f_jᵀ + λ_i I) x_i = Σ_j D_ij f_j + λ_i x_i^prev,

    one batched ``[n, r, r]`` solve. ``C, D [n, m]``, ``F_ [r, m]``, ``X_prev [n, r]`` → ``[n, r]``.
    The proximal term keeps singular systems (dead rows, duplicate components) solvable without
    biasing the fit: the objective still never increases, and a fixed point is unchanged by it.
    """
    r, m = F_.shape
    outer = (F_[:, None, :] * F_[None, :, :]).reshape(r * r, m)  # [r², m]: f_j f_jᵀ per j
    G = (C @ outer.T).view(-1, r, r)  # [n, r, r]
    rhs = D @ F_.T  # [n, r]
    diag = G.diagonal(dim1=1, dim2=2).mean(-1)  # [n]
    lam = ridge * (diag + diag.mean() + torch.finfo(G.dtype).tiny)  # [n]
    eye = torch.eye(r, dtype=G.dtype, device=G.device)
    rhs = rhs + lam[:, None] * X_prev
    return torch.linalg.solve(G + lam[:, None, None] * eye, rhs.unsqueeze(-1)).squeeze(-1)


def _balance(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rescale each rank component (``A_k ← c A_k``, ``B_k ← B_k / c``) so both sides have
    the same RMS: ``M`` is unchanged, and the factors cannot drift apart in scale."""
    rms_a = A.square().mean(1).sqrt()  # [r]
    rms_b = B.square().mean(0).sqrt()  # [r]
    ok = (rms_a > 0) & (rms_b > 0)
    c = torch.where(ok, (rms_b / rms_a.clamp_min(1e-300)).sqrt(), torch.ones_like(rms_a))
    return A * c[:, None], B / c[None, :]


def weighted_als(
    W0: torch.Tensor,
    target: torch.Tensor,
    rank: int,
    *,
    weights: torch.Tensor | None = None,
    iters: int = DEFAULT_ITERS,
    tol: float = DEFAULT_TOL,
    seed: int = 0,
    history: list[float] | None = None,
) -> FloraWeights:
    """Rank-``rank`` FLoRA factors minimising ``Σ_ij w_ij (W0_ij M_ij − T_ij)²``, ``M = B A / r``.

    With ``C = w ∘ W0²`` and ``D = w ∘ W0 ∘ T`` the objective is ``Σ C M² − 2 D M + const``:
    quadratic in ``A`` for fixed ``B`` and vice versa. Alternating exact least squares solves one
    side at a time (each column of ``A``, then each row of ``B``, one batched r×r solve each,
    with a tiny proximal term, see :func:`_solve_rows`), so the objective never increases. It
    starts at the identity (``M = 1``, exactly the base model: :meth:`FloraWeights.identity`
    with seeded noise in the extra components) and solves ``A`` first, so the result is never
    worse than the base. Stops when the relative decrease of the objective falls below ``tol``
    or after ``iters`` rounds. Float64 inside; the result has ``W0``'s dtype. ``weights``
    broadcasts to ``[out, in]`` (e.g. ``[1, in]``: one weight per input feature).
    ``history``, if given, receives the objective at the init and after every round.
    """
    if rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    if W0.shape != target.shape or W0.dim() != 2:
        raise ValueError(
            f"W0 and target must be the same [out, in] shape, got {list(W0.shape)} and "
            f"{list(target.shape)}"
        )
    W, T = W0.double(), target.double()
    w = torch.ones_like(W) if weights is None else weights.double().to(W.device).expand_as(W)
    C, D = w * W * W, w * W * T  # [out, in]
    out_f, in_f = W.shape
    gen = torch.Generator().manual_seed(seed)
    init = FloraWeights.identity(
        rank, in_f, out_f, noise=INIT_NOISE, generator=gen, dtype=torch.float64
    )
    A, B = init.A.to(W.device), init.B.to(W.device)
    f = weighted_objective(W, T, B @ A / rank, w)
    if history is not None:
        history.append(f)
    scale = float((w * T * T).sum()) or 1.0
    for _ in range(iters):
        A = _solve_rows(C.T, D.T, (B / rank).T, A.T).T  # columns of A: M_ij = Σ_k B_ik/r A_kj
        B = _solve_rows(C, D, A / rank, B)  # rows of B
        A, B = _balance(A, B)
        f_new = weighted_objective(W, T, B @ A / rank, w)
        if history is not None:
            history.append(f_new)
        done = f - f_new <= tol * max(f, 1e-300) or f_new <= 1e-28 * scale
        f = f_new
        if done:
            break
    return FloraWeights(A=A.to(W0.dtype), B=B.to(W0.dtype))


def relative_weight_error(
    W0: torch.Tensor,
    target: torch.Tensor,
    flora: FloraWeights,
    *,
    weights: torch.Tensor | None = None,
) -> float:
    """``‖W0 ∘ M − T‖ / ‖T − W0‖`` (weighted norms if ``weights``): the error relative to the
    LoRA delta. 0 is exact; 1.0 means "no better than the base model"."""
    delta = weighted_objective(W0, target, torch.ones_like(W0, dtype=torch.float64), weights)
    err = weighted_objective(W0, target, flora.multiplier().double(), weights)
    if delta == 0:  # a LoRA that changes nothing: any error at all is infinitely worse
        return 0.0 if err == 0 else float("inf")
    return (err / delta) ** 0.5


# --- from a model ------------------------------------------------------------------------


def base_weight(model: GPTBigCode, path: str) -> torch.Tensor:
    """The base ``[out, in]`` weight of the linear at HF path ``path`` (adapted or not)."""
    try:
        module = model.get_submodule(path)
    except AttributeError:
        raise ValueError(f"the base model has no layer {path!r}") from None
    if isinstance(module, AdaptedLinear):
        module = module.base
    if not isinstance(module, nn.Linear):
        raise ValueError(f"{path!r} is not a linear layer of the base model")
    return module.weight.detach()


def lora_target(W0: torch.Tensor, lora: LoraWeights) -> torch.Tensor:
    """``T = W0 + scale · B A`` in float64: the weight a LoRA adapter makes of ``W0``."""
    return W0.double() + lora.scale * (lora.B.double() @ lora.A.double())


def input_weights(x: torch.Tensor) -> torch.Tensor:
    """``s_j = mean_t x_tj²`` over calibration inputs ``x [..., in]`` → ``[in]`` (float64).

    ``Σ_j s_j ΔW_ij²`` is the diagonal part of ``‖X ΔWᵀ‖² / N = Σ_i ΔW_i (XᵀX/N) ΔW_iᵀ``.
    """
    return x.detach().double().reshape(-1, x.shape[-1]).square().mean(0)


def _column_weights(s: torch.Tensor, in_features: int, path: str) -> torch.Tensor:
    """``s`` as ``[1, in]`` weights, normalised to mean 1 (the argmin is scale-free) and
    floored so an input that is never active still pins its column (else it is undetermined)."""
    s = input_weights(s) if s.dim() == 2 else s.double()
    if s.shape != (in_features,):
        raise ValueError(f"{path}: calibration weights are {list(s.shape)}, need [{in_features}]")
    s = s / s.mean().clamp_min(1e-300)
    return s.clamp_min(WEIGHT_FLOOR)[None, :]


def convert_lora(
    model: GPTBigCode,
    lora_layers: Mapping[str, LoraWeights],
    rank: int,
    *,
    calibration: Mapping[str, torch.Tensor] | None = None,
    iters: int = DEFAULT_ITERS,
    tol: float = DEFAULT_TOL,
    seed: int = 0,
) -> dict[str, FloraWeights]:
    """Rank-``rank`` FLoRA factors per layer fitted to each LoRA layer's adapted weight.

    ``calibration`` maps a layer's HF path to its input weights ``s [in]`` (from
    :func:`collect_calibration`) or raw inputs ``[N, in]``; None fits plain ‖W0 ∘ M − T‖_F.
    Raises ``ValueError`` when a layer does not exist in, or does not fit, the base model.
    """
    out: dict[str, FloraWeights] = {}
    for path, lora in lora_layers.items():
        if not isinstance(lora, LoraWeights):
            raise ValueError(f"{path}: expected LoRA weights, got {type(lora).__name__}")
        W0 = base_weight(model, path)
        lora.validate(W0.shape[1], W0.shape[0])
        weights = None
        if calibration is not None:
            if path not in calibration:
                raise ValueError(f"no calibration inputs for {path}")
            weights = _column_weights(calibration[path].to(W0.device), W0.shape[1], path)
        fit = weighted_als(
            W0, lora_target(W0, lora), rank, weights=weights, iters=iters, tol=tol, seed=seed
        )
        out[path] = FloraWeights(A=fit.A.float(), B=fit.B.float())
    return out


def dense_layer_inputs(
    model: GPTBigCode, input_ids: torch.Tensor
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The base model's dense forward written out, returning the input of every adaptable
    linear (``{hf_path: [B, S, in]}``) and the logits ``[B, S, V]``.

    An explicit loop rather than forward hooks: what is captured is visible here, and nothing
    is attached to the model. It mirrors :meth:`GPTBigCode.forward` step by step; a test checks
    that the logits agree, so a change to the model that this loop misses fails loudly.
    """
    t = model.transformer
    pos = torch.arange(input_ids.shape[1], device=input_ids.device)
    x = t.wte(input_ids) + t.wpe(pos)  # [B, S, E]
    inputs: dict[str, torch.Tensor] = {}
    for i, block in enumerate(t.h):
        pre = f"transformer.h.{i}."
        h = block.ln_1(x)
        inputs[pre + "attn.c_attn"] = h
        q, k, v = block.attn.split_heads(block.attn.c_attn(h))
        o = dense_attention(q, k, v, model.scale).reshape(*h.shape[:-1], -1)  # [B, S, E]
        inputs[pre + "attn.c_proj"] = o
        x = x + block.attn.c_proj(o)
        h = block.ln_2(x)
        inputs[pre + "mlp.c_fc"] = h
        g = F.gelu(block.mlp.c_fc(h), approximate="tanh")  # [B, S, inner]
        inputs[pre + "mlp.c_proj"] = g
        x = x + block.mlp.c_proj(g)
    return inputs, model.head(x)


@torch.no_grad()
def collect_calibration(
    model: GPTBigCode, windows: torch.Tensor, *, batch_size: int = 8
) -> dict[str, torch.Tensor]:
    """Per adaptable layer, ``s_j = mean x_j²`` of its inputs over the base model's dense
    forward on token ``windows [N, S]`` (every block's c_attn, attn.c_proj, mlp.c_fc, c_proj)."""
    sums: dict[str, torch.Tensor] = {}
    tokens = 0
    for chunk in windows.to(model.device).split(batch_size):
        inputs, _ = dense_layer_inputs(model, chunk)
        for path, x in inputs.items():
            s = x.double().reshape(-1, x.shape[-1]).square().sum(0)
            sums[path] = sums[path] + s if path in sums else s
        tokens += chunk.numel()
    return {path: s / tokens for path, s in sums.items()}


# --- optional: distillation toward the LoRA model's logits -----------------------------


def distill(
    model: GPTBigCode,
    lora_layers: Mapping[str, LoraWeights],
    flora_layers: Mapping[str, FloraWeights],
    windows: torch.Tensor,
    *,
    steps: int = 50,
    lr: float = 1e-2,
    batch_size: int = 4,
    seed: int = 0,
) -> dict[str, FloraWeights]:
    """Refine converted factors by minimising ``KL(p_LoRA ‖ p_FLoRA)`` per token on ``windows``.

    Works on a private copy of the model's adapter banks: the LoRA teacher sits in slot 0, the
    FLoRA student in slot 1, and only the FLoRA tables require grad (gradients flow through the
    model's own FLoRA path). Adam on the tables, scaled per :meth:`AdapterBank.lr_scales`.
    Returns the refined factors; ``model`` itself is left as it was.
    """
    rank = max(w.rank for w in flora_layers.values())
    max_rank = max(rank, *(w.rank for w in lora_layers.values()))
    # A fresh model with the same base weights: ``model`` may carry banks of any size, or none.
    net = GPTBigCode(model.args).to(device=model.device, dtype=model.dtype)
    net.load_state_dict(model.base_state_dict())
    targets = sorted({p.split(".", 3)[3] for p in {*lora_layers, *flora_layers}})
    kinds = frozenset({AdapterKind.FLORA, AdapterKind.LORA})
    net.enable_adapters(
        ["c_attn" if t == "attn.c_attn" else t for t in targets],
        BankConfig(max_slots=2, max_rank=max_rank, kinds=kinds),
    )
    net.requires_grad_(False).eval()
    net.load_adapter(0, lora_layers)
    net.load_adapter(1, flora_layers)
    layers = dict(net.adapted_layers())
    params = []
    for path in flora_layers:
        bank = layers[path].bank
        for name, factor in bank.lr_scales(1).items():
            table = getattr(bank, name).requires_grad_(True)
            params.append({"params": [table], "lr": lr * factor})
    optimizer = torch.optim.Adam(params)
    gen = torch.Generator().manual_seed(seed)
    windows = windows.to(net.device)
    for _ in range(steps):
        pick = torch.randint(
            0, windows.shape[0], (min(batch_size, windows.shape[0]),), generator=gen
        )
        ids = windows[pick]
        n = ids.numel()
        with torch.no_grad():
            teacher = net(ids, AdapterBatch.from_slots([0] * n, device=net.device))
        student = net(ids, AdapterBatch.from_slots([1] * n, device=net.device))
        loss = F.kl_div(
            F.log_softmax(student.float(), -1).flatten(0, 1),
            F.log_softmax(teacher.float(), -1).flatten(0, 1),
            log_target=True,
            reduction="batchmean",
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    refined = {}
    for path in flora_layers:
        w = layers[path].bank.export(1)
        assert isinstance(w, FloraWeights)
        refined[path] = FloraWeights(A=w.A.detach().clone(), B=w.B.detach().clone())
    return refined
