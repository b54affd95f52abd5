"""One adapter's tensors checked against a model: names, shapes, magnitudes and the serving
limits. The registry (numpy, at upload) and the engine (torch, at load) call the same
:func:`check_adapter` with their own way of reading a tensor, so their verdicts cannot drift.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from adapter_format.config import CONFIG_FILE, WEIGHTS_FILE, AdapterConfig
from adapter_format.errors import AdapterFormatError
from adapter_format.kinds import AdapterKind
from adapter_format.limits import ServingLimits
from adapter_format.magnitude import check_magnitude
from adapter_format.modules import PARAMS, TENSOR_KEY, short_target

# abs_max(tensor name, axis) → the largest |value| along ``axis`` (a list), or overall (None)
AbsMax = Callable[[str, int | None], list[float]]


@dataclass(frozen=True)
class ModelShape:
    """A GPTBigCode shape: enough to know every adaptable linear's ``(in, out)``."""

    name: str
    n_layer: int
    n_embd: int
    n_head: int
    multi_query: bool = True
    n_inner: int | None = None

    def module_shape(self, target: str) -> tuple[int, int]:
        """``(in_features, out_features)`` of ``attn.c_attn`` etc."""
        head_dim = self.n_embd // self.n_head
        kv = 2 * head_dim * (1 if self.multi_query else self.n_head)
        inner = self.n_inner or 4 * self.n_embd
        return {
            "attn.c_attn": (self.n_embd, self.n_embd + kv),
            "attn.c_proj": (self.n_embd, self.n_embd),
            "mlp.c_fc": (self.n_embd, inner),
            "mlp.c_proj": (inner, self.n_embd),
        }[target]


@dataclass(frozen=True)
class AdapterLayout:
    """What the checks learned: each module's rank, and the short target names."""

    kind: AdapterKind
    ranks: dict[str, int]  # "transformer.h.0.attn.c_attn" → rank (1 for IA3)
    tensors: dict[str, dict[str, str]]  # module → param → tensor name

    @property
    def rank(self) -> int:
        return max(self.ranks.values())

    @property
    def targets(self) -> list[str]:
        return sorted({short_target(m.split(".", 3)[3]) for m in self.ranks})


def check_adapter(
    config: AdapterConfig,
    shapes: Mapping[str, tuple[int, ...]],
    abs_max: AbsMax,
    model: ModelShape,
    limits: ServingLimits,
) -> AdapterLayout:
    """Every check that needs the weights; ``shapes`` maps each tensor name to its shape."""
    tensors = _group(config.kind, shapes, model)
    ranks = {
        module: _check_module(config, module, params, shapes, abs_max, model, limits)
        for module, params in sorted(tensors.items())
    }
    layout = AdapterLayout(config.kind, ranks, tensors)
    limits.check(config.kind, ranks.values(), layout.targets)
    return layout


def _group(kind: AdapterKind, names: Iterable[str], model: ModelShape) -> dict[str, dict[str, str]]:
    found: dict[str, dict[str, str]] = {}
    for name in names:
        match = TENSOR_KEY.fullmatch(name)
        if match is None or match["param"] not in PARAMS[kind]:
            raise AdapterFormatError(f"unexpected tensor {name[:200]!r} in a {kind} adapter")
        if int(match["layer"]) >= model.n_layer:
            raise AdapterFormatError(f"{name}: {model.name} has only {model.n_layer} layers")
        found.setdefault(match["module"], {})[match["param"]] = name
    if not found:
        raise AdapterFormatError(f"{WEIGHTS_FILE} holds no {kind} weights")
    for module, params in found.items():
        missing = [p for p in PARAMS[kind] if p not in params]
        if missing:
            raise AdapterFormatError(f"{module}: {missing[0]} is missing")
    return found


def _check_module(
    config: AdapterConfig,
    module: str,
    params: dict[str, str],
    shapes: Mapping[str, tuple[int, ...]],
    abs_max: AbsMax,
    model: ModelShape,
    limits: ServingLimits,
) -> int:
    """Shapes, then magnitude, of one module's tensors; returns its rank."""
    kind, limit = config.kind, limits.max_magnitude
    n_in, n_out = model.module_shape(module.split(".", 3)[3])
    if kind is AdapterKind.IA3:
        name = params["ia3_l"]
        if config.is_feedforward(module):  # PEFT scales a feed-forward module's input
            ok, want = shapes[name] in ((1, n_in), (n_in,)), f"(1, {n_in}) (feed-forward)"
        else:  # and any other module's output
            ok, want = shapes[name] in ((n_out, 1), (n_out,)), f"({n_out}, 1)"
        if not ok:
            raise AdapterFormatError(
                f"{module} of {model.name}: expected {want} (feedforward_modules in "
                f"{CONFIG_FILE}), got {shapes[name]}",
                param="weights",
            )
        check_magnitude(module, kind, abs_max(name, None), [], limit)
        return 1
    a, b = (params[p] for p in PARAMS[kind])
    rank = config.rank_of(module)
    if (shapes[a], shapes[b]) != ((rank, n_in), (n_out, rank)):
        raise AdapterFormatError(
            f"{module} of {model.name}: expected {PARAMS[kind][0]} ({rank}, {n_in}) and "
            f"{PARAMS[kind][1]} ({n_out}, {rank}) (r={rank} in {CONFIG_FILE}), "
            f"got {(tuple(shapes[a]), tuple(shapes[b]))}",
            param="weights",
        )
    scale = config.lora_scale(module, rank) if kind is AdapterKind.LORA else 1.0
    check_magnitude(module, kind, abs_max(a, 1), abs_max(b, 0), limit, scale)
    return rank
