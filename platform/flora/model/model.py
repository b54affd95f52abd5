"""GPTBigCode (StarCoder) in plain PyTorch, with per-token adapters on chosen linear layers.

Parameter names equal HF's ``GPTBigCodeForCausalLM`` (``transformer.h.0.attn.c_attn.weight``…),
so checkpoints load without renaming. Two entry points share every weight:

- :meth:`GPTBigCode.forward` — dense ``[B, S]`` causal pass, no cache (scoring, training);
- :meth:`GPTBigCode.step` — one serving step over packed tokens of many sequences, reading and
  writing the paged :class:`KVCache`; logits only for the rows that will be sampled
  (:meth:`GPTBigCode.hidden_step` stops before the head, so the engine can check every row).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from flora.adapters import AdaptedLinear, AdapterBatch, BankConfig, Dispatcher, MaterialisedCache
from flora.adapters.weights import AdapterWeights
from flora.model.attention import AttentionMetadata, KVCache, dense_attention, paged_attention
from flora.model.config import ADAPTABLE_MODULES, ModelArgs

# attend(q [.., H, hd], k [.., Hkv, hd], v) → [.., H, hd], bound per layer for one pass.
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _linear(module: nn.Module, x: torch.Tensor, adapters: AdapterBatch | None) -> torch.Tensor:
    return module(x, adapters) if isinstance(module, AdaptedLinear) else module(x)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_head, self.kv_heads, self.head_dim = args.n_head, args.kv_heads, args.head_dim
        self.multi_query = args.multi_query
        kv = 2 * args.kv_heads * args.head_dim
        self.c_attn: nn.Module = nn.Linear(args.n_embd, args.n_embd + kv)
        self.c_proj: nn.Module = nn.Linear(args.n_embd, args.n_embd)

    def split_heads(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``[..., E + 2·kv]`` → q ``[..., H, hd]``, k and v ``[..., Hkv, hd]`` (HF's layouts)."""
        lead, hd = qkv.shape[:-1], self.head_dim
        if self.multi_query:  # q | k | v
            q, k, v = qkv.split((self.n_head * hd, hd, hd), dim=-1)
            return q.view(*lead, self.n_head, hd), k.unsqueeze(-2), v.unsqueeze(-2)
        q, k, v = qkv.view(*lead, self.n_head, 3 * hd).split(hd, dim=-1)  # per head: q | k | v
        return q, k, v

    def forward(
        self, x: torch.Tensor, adapters: AdapterBatch | None, attend: Attend
    ) -> torch.Tensor:
        q, k, v = self.split_heads(_linear(self.c_attn, x, adapters))
        o = attend(q, k, v)  # [..., H, hd]
        return _linear(self.c_proj, o.reshape(*x.shape[:-1], -1), adapters)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.c_fc: nn.Module = nn.Linear(args.n_embd, args.inner)
        self.c_proj: nn.Module = nn.Linear(args.inner, args.n_embd)

    def forward(self, x: torch.Tensor, adapters: AdapterBatch | None) -> torch.Tensor:
        h = F.gelu(_linear(self.c_fc, x, adapters), approximate="tanh")
        return _linear(self.c_proj, h, adapters)


def _feed_forward(x: torch.Tensor, weights: tuple) -> torch.Tensor:
    """:class:`Block`'s second half without adapters, as a function of its weights, so one
    compiled graph serves every block (its weights are inputs, not guarded constants)."""
    ln_w, ln_b, eps, fc_w, fc_b, proj_w, proj_b = weights
    h = F.layer_norm(x, (x.shape[-1],), ln_w, ln_b, eps)
    return x + F.linear(F.gelu(F.linear(h, fc_w, fc_b), approximate="tanh"), proj_w, proj_b)


class Block(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(args.n_embd, eps=args.layer_norm_epsilon)
        self.attn = Attention(args)
        self.ln_2 = nn.LayerNorm(args.n_embd, eps=args.layer_norm_epsilon)
        self.mlp = MLP(args)
        self.compiled_feed_forward: Callable[[torch.Tensor], torch.Tensor] | None = None

    def feed_forward(self, x: torch.Tensor, adapters: AdapterBatch | None) -> torch.Tensor:
        """``x + mlp(ln_2(x))``: the block's second half, compiled when it holds no adapter."""
        if self.compiled_feed_forward is not None:
            return self.compiled_feed_forward(x)
        return x + self.mlp(self.ln_2(x), adapters)

    def forward(
        self, x: torch.Tensor, adapters: AdapterBatch | None, attend: Attend
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), adapters, attend)
        return self.feed_forward(x, adapters)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.wte = nn.Embedding(args.vocab_size, args.n_embd)
        self.wpe = nn.Embedding(args.n_positions, args.n_embd)
        self.h = nn.ModuleList(Block(args) for _ in range(args.n_layer))
        self.ln_f = nn.LayerNorm(args.n_embd, eps=args.layer_norm_epsilon)


class GPTBigCode(nn.Module):
    """StarCoder's architecture: multi-query attention, learned positions, tied ``lm_head``."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.transformer = Transformer(args)
        self.scale = args.head_dim**-0.5 if args.scale_attn_weights else 1.0
        self.adapter_targets: tuple[str, ...] = ()

    @property
    def device(self) -> torch.device:
        return self.transformer.wte.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.wte.weight.dtype

    def init_weights(self, seed: int = 0, std: float = 0.02) -> GPTBigCode:
        """Random weights in HF's scheme (normal(0, 0.02), projections scaled by depth)."""
        gen = torch.Generator(self.device).manual_seed(seed)  # on the device: fast for 15B
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("bias"):
                    p.zero_()
                elif ".ln_" in name or name.startswith("transformer.ln_f"):
                    p.fill_(1.0)
                else:
                    last = name.endswith("c_proj.weight")
                    p.normal_(
                        0.0, std / (2 * self.args.n_layer) ** 0.5 if last else std, generator=gen
                    )
        return self

    # --- adapters --------------------------------------------------------------------------

    def enable_adapters(
        self,
        targets: Iterable[str] = ("c_attn",),
        config: BankConfig | None = None,
        *,
        dispatcher: Dispatcher | None = None,
        cache: MaterialisedCache | None = None,
    ) -> None:
        """Wrap the target linears of every block in :class:`AdaptedLinear` (weights shared)."""
        targets = tuple(dict.fromkeys(targets))
        unknown = [t for t in targets if t not in ADAPTABLE_MODULES]
        if unknown:
            raise ValueError(f"unknown adapter targets {unknown}; choose from {ADAPTABLE_MODULES}")
        if self.adapter_targets:
            raise RuntimeError(f"adapters already enabled on {self.adapter_targets}")
        dispatcher = dispatcher or Dispatcher()
        for block in self.transformer.h:
            for target in targets:
                parent, attr = self._parent(block, target)
                wrapped = AdaptedLinear(
                    getattr(parent, attr), config, dispatcher=dispatcher, cache=cache
                )
                setattr(parent, attr, wrapped)
        self.adapter_targets = targets

    @staticmethod
    def _parent(block: Block, target: str) -> tuple[nn.Module, str]:
        owner, _, attr = ("attn." + target if "." not in target else target).rpartition(".")
        return block.get_submodule(owner), attr

    def load_adapter(self, slot: int, layers: Mapping[str, AdapterWeights]) -> None:
        """Put one adapter (weights per HF module path) in ``slot`` of every adapted layer.

        Adapted layers the adapter does not cover get the identity in that slot.
        """
        adapted = dict(self.adapted_layers())
        extra = sorted(set(layers) - set(adapted))
        if extra:
            raise ValueError(
                f"the adapter targets {extra[:3]}, but this model adapts only "
                f"{list(self.adapter_targets)}; start it with those targets enabled"
            )
        for name, layer in adapted.items():
            if name in layers:
                layer.load_adapter(slot, layers[name])
            else:
                layer.evict_adapter(slot)

    def export_adapter(self, slot: int) -> dict[str, AdapterWeights]:
        """The adapter in ``slot`` per HF module path (layers it does not cover left out)."""
        layers = {name: layer.bank.export(slot) for name, layer in self.adapted_layers()}
        return {name: w for name, w in layers.items() if w is not None}

    def evict_adapter(self, slot: int) -> None:
        for _, layer in self.adapted_layers():
            layer.evict_adapter(slot)

    def adapted_layers(self) -> list[tuple[str, AdaptedLinear]]:
        """``(hf_path, layer)`` per adapted linear; paths like ``transformer.h.0.attn.c_attn``."""
        return [(n, m) for n, m in self.named_modules() if isinstance(m, AdaptedLinear)]

    def base_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's weights under HF names (adapter wrappers and banks left out)."""
        state = {}
        for name, tensor in self.state_dict().items():
            if ".bank." in name:
                continue
            state[name.replace(".base.", ".")] = tensor
        return state

    # --- compilation -----------------------------------------------------------------------

    def compile_feed_forward(self, mode: str) -> float:
        """``torch.compile`` each block's feed-forward half (layer norm, MLP, residual: one fused
        graph for any token count) unless adapters target the MLP; returns seconds spent.

        ``mode`` is ``off`` (back to eager), ``default`` or ``max`` (inductor's max-autotune,
        without CUDA graphs: the step's shapes vary). Attention and adapted linears stay eager:
        the pool is updated in place and the dispatcher picks paths per batch, neither of which
        a graph captures.
        """
        options = {"default": None, "max": "max-autotune-no-cudagraphs"}
        if mode not in (*options, "off"):
            raise ValueError(f"unknown compile mode {mode!r}; choose from off, {list(options)}")
        for block in self.transformer.h:
            block.compiled_feed_forward = None
        if mode == "off" or any(t.startswith("mlp.") for t in self.adapter_targets):
            return 0.0
        start = time.perf_counter()
        compiled = torch.compile(_feed_forward, dynamic=True, mode=options[mode])
        for block in self.transformer.h:
            ln, fc, proj = block.ln_2, block.mlp.c_fc, block.mlp.c_proj
            weights = (ln.weight, ln.bias, ln.eps, fc.weight, fc.bias, proj.weight, proj.bias)
            block.compiled_feed_forward = functools.partial(compiled, weights=weights)
        with torch.inference_mode():  # compile now (one graph serves every token count)
            for rows in (3, 5):
                x = torch.zeros(rows, self.args.n_embd, dtype=self.dtype, device=self.device)
                for block in self.transformer.h:
                    block.feed_forward(x, None)
        return time.perf_counter() - start

    # --- forward passes --------------------------------------------------------------------

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final hidden states ``[.., E]`` → logits ``[.., V]`` (``ln_f``, then the tied head)."""
        return F.linear(self.transformer.ln_f(h), self.transformer.wte.weight)

    def forward(
        self, input_ids: torch.Tensor, adapters: AdapterBatch | None = None
    ) -> torch.Tensor:
        """``input_ids [B, S]`` → logits ``[B, S, V]``; ``adapters`` has one slot per token."""
        s = input_ids.shape[1]
        if s > self.args.n_positions:
            raise ValueError(
                f"sequence of {s} tokens exceeds the context of {self.args.n_positions}"
            )
        pos = torch.arange(s, device=input_ids.device)
        x = self.transformer.wte(input_ids) + self.transformer.wpe(pos)  # [B, S, E]

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return dense_attention(q, k, v, self.scale)

        for block in self.transformer.h:
            x = block(x, adapters, attend)
        return self.head(x)

    def hidden_step(
        self,
        input_ids: torch.Tensor,  # [T] packed tokens of every sequence in the step
        positions: torch.Tensor,  # [T]
        meta: AttentionMetadata,
        cache: KVCache,
        adapters: AdapterBatch | None = None,
    ) -> torch.Tensor:
        """One serving step up to the final hidden states ``[T, E]`` (before ``ln_f``).

        The engine checks every row of them for overflow, so it needs them, not only logits.
        """
        x = self.transformer.wte(input_ids) + self.transformer.wpe(positions)  # [T, E]
        for i, block in enumerate(self.transformer.h):
            layer_cache = cache.layer(i)

            def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, c=layer_cache):
                return paged_attention(q, k, v, c, meta, self.scale)

            x = block(x, adapters, attend)
        return x

    def step(
        self,
        input_ids: torch.Tensor,  # [T] packed tokens of every sequence in the step
        positions: torch.Tensor,  # [T]
        meta: AttentionMetadata,
        cache: KVCache,
        adapters: AdapterBatch | None = None,
        logit_rows: torch.Tensor | None = None,  # [N] rows to compute logits for
    ) -> torch.Tensor:
        """One serving step; returns logits ``[N, V]`` for ``logit_rows`` (all rows if None)."""
        x = self.hidden_step(input_ids, positions, meta, cache, adapters)
        if logit_rows is not None:
            x = x[logit_rows]
        return self.head(x)
