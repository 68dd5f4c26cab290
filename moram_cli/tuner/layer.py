"""`MoramLayer`: a linear layer plus a growing bank of gated rank-1 experts."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features
from torch import nn
from torch.nn import functional as F

from moram_cli.tuner.config import MoramConfig
from moram_cli.tuner.gating import kept_per_bank, kept_ranks, spread
from moram_cli.tuner.keys import kaiming_keys
from moram_cli.tuner.routing import SourceRouter


# Gathering the kept values per token (`mix_values`) reads kept columns of B per token, the dense product `B (g ⊙ z)`
# all R: the gathered mix wins from R = this many times the kept slots on, by whether gradients are computed. One
# 576 → 576 layer, 8 × 128 tokens, k 4, 2 CPU threads on an otherwise idle machine, ms dense / gathered: inference 4.9 /
# 5.2 at 40 ranks, 6.2 / 8.4 at 136, 8.6 / 8.6 at 520; forward and backward 6.2 / 8.0, 8.8 / 10.1, 20.0 / 17.1. A
# bank-scoped gate keeps k per bank, half of r = 8 ranks: gathered, 64 banks took 154 ms against 16 ms dense.
GATHER_RANKS_PER_KEPT = {False: 128, True: 64}


def mix_values(B: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ_j weights[..., j] · B[:, indices[..., j]] for every token: the output of only the kept experts, with the
    gradients of the dense product (to B and to the weights)."""
    bags = indices.reshape(-1, indices.shape[-1])
    mixed = F.embedding_bag(bags, B.t(), per_sample_weights=weights.reshape(bags.shape).to(B.dtype), mode="sum")
    return mixed.view(*indices.shape[:-1], B.shape[0])


class MoramLayer(nn.Module, BaseTunerLayer):
    """Wraps `base_layer`; adds `B (g ⊙ z)` with `z = A x` over all ranks.

    Ranks of earlier tasks live in the frozen buffers `moram_A_frozen` /
    `moram_B_frozen`, stacked once when the memory is loaded; the ranks being
    trained live in the parameters `moram_A` / `moram_B`. The gate runs over
    both together, so a new task can reuse old experts.
    """

    adapter_layer_names = ("moram_A", "moram_B", "moram_gain")
    other_param_names = ("moram_A_frozen", "moram_B_frozen")
    # Receives every gate `g` this layer computes; set only while gate statistics are collected
    # (see moram_cli.inspection.gates), so the ordinary forward pass pays one `is None` test.
    gate_observer: Callable[[torch.Tensor], None] | None = None
    # Set on the layers of a routed store (see moram_cli.tuner.routing): the router, and which ranks each of its
    # groups holds.
    router: SourceRouter | None = None
    group_member: torch.Tensor | None = None  # groups × R, whether each rank belongs to each group
    # Set on the layers of a task-routed store: each bank's task prototype for this layer's input (banks × d_in).
    prototypes: torch.Tensor | None = None

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: MoramConfig) -> None:
        super().__init__()
        self.base_layer = base_layer
        in_features, out_features = _get_in_out_features(base_layer)
        if in_features is None:
            raise TypeError(f"MoRAM cannot adapt a {type(base_layer).__name__}; target linear layers")
        self.in_features, self.out_features = in_features, out_features
        self.moram_A = nn.ParameterDict()
        self.moram_B = nn.ParameterDict()
        # Under gate scope "weighted": the trainable bank's gain per frozen bank (none for the first bank).
        self.moram_gain = nn.ParameterDict()
        self.moram_A_frozen = BufferDict(persistent=True)
        self.moram_B_frozen = BufferDict(persistent=True)
        self.config = config
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self._active_adapter = adapter_name
        self.merged_adapters = []
        self.frozen_sizes: list[int] = []
        # Each bank's rank indices (frozen banks, then the trainable one), a row per bank padded with -1: read by the gate
        # when config.gate_scope is "bank" or "task", and by routing. A buffer, so that it moves with the model.
        self.register_buffer("bank_table", None, persistent=False)
        # Under gate scope "weighted", the frozen banks' gains: row b weighs every frozen bank when the answer is bank b's
        # task (its gains over the banks before it, 1 for itself, 0 for later ones).
        self.register_buffer("gain_table", torch.zeros(0, 0) if config.gate_scope == "weighted" else None, persistent=False)

    @property
    def frozen_ranks(self) -> int:
        name = self.active_adapters[0]
        return self.moram_A_frozen[name].shape[0] if name in self.moram_A_frozen else 0

    @property
    def kept_per_token(self) -> int:
        """How many ranks a token's gate can keep: k_eff (at least 2), per bank when the gate is bank-scoped."""
        k_eff = max(self.config.k, 2)
        if self.config.gate_scope == "all" or self.bank_table is None:
            return k_eff
        return sum(min(k_eff, int(size)) for size in (self.bank_table >= 0).sum(1))

    @property
    def learns_alone(self) -> bool:
        """Whether the trainable bank runs without the frozen ones: in training under gate scope "task", where each task
        is learned on the bare model plus its own bank, as task routing will answer it."""
        return self.config.gate_scope == "task" and self.training and self.active_adapters[0] in self.moram_A

    def set_frozen(self, A: torch.Tensor, B: torch.Tensor, sizes: list[int] | None = None, gains: torch.Tensor | None = None) -> None:
        """Install the stacked ranks of all earlier tasks (`A`: R×d_in, `B`: d_out×R), `sizes` ranks per bank (one bank
        of R by default) and, under gate scope "weighted", their gain table (banks × banks; default: every gain 1)."""
        expected = ((A.shape[0], self.in_features), (self.out_features, A.shape[0]))
        if (tuple(A.shape), tuple(B.shape)) != expected:
            raise ValueError(f"bank shapes A{tuple(A.shape)} B{tuple(B.shape)} do not fit this layer, expected A{expected[0]} B{expected[1]}")
        device = self.get_base_layer().weight.device
        name = self.active_adapters[0]
        self.moram_A_frozen[name] = A.detach().to(device=device, dtype=torch.float32)
        self.moram_B_frozen[name] = B.detach().to(device=device, dtype=torch.float32)
        self.frozen_sizes = list(sizes) if sizes is not None else [A.shape[0]]
        if sum(self.frozen_sizes) != A.shape[0]:
            raise ValueError(f"bank sizes {self.frozen_sizes} do not add up to the {A.shape[0]} ranks given")
        if self.config.gate_scope == "weighted":
            banks = len(self.frozen_sizes)
            gains = torch.ones(banks, banks).tril() if gains is None else gains
            if tuple(gains.shape) != (banks, banks):
                raise ValueError(f"a gain table of shape {tuple(gains.shape)} does not fit {banks} banks")
            self.gain_table = gains.detach().to(device=device, dtype=torch.float32)
        self._table_banks()

    def fold_frozen(self) -> None:
        """Add the frozen ranks' `B A` into the base weight and drop them: exact for an ungated layer (IncLoRA),
        whose frozen ranks always add their full product, and the layer then costs what the bare one does."""
        if self.config.gate != "none":
            raise ValueError("only an ungated layer's ranks can be folded into its weight: a gate depends on the input")
        name = self.active_adapters[0]
        if name not in self.moram_A_frozen:
            return
        weight = self.get_base_layer().weight
        with torch.no_grad():
            weight += (self.moram_B_frozen[name] @ self.moram_A_frozen[name]).to(weight.dtype)
        del self.moram_A_frozen[name], self.moram_B_frozen[name]
        self.frozen_sizes = []
        self._table_banks()

    def add_ranks(self, r: int, generator: torch.Generator | None = None, keys: torch.Tensor | None = None) -> None:
        """Append `r` trainable experts, values zero (output unchanged): their keys are `keys` (at most `r` rows),
        the rest drawn like `nn.Linear` weights from `generator`."""
        given = keys if keys is not None else torch.zeros(0, self.in_features)
        A = torch.cat([given.float().cpu(), kaiming_keys(r - given.shape[0], self.in_features, generator)])
        device = self.get_base_layer().weight.device
        name = self.active_adapters[0]
        self.moram_A[name] = nn.Parameter(A.to(device))
        self.moram_B[name] = nn.Parameter(torch.zeros(self.out_features, r, device=device))
        if self.config.gate_scope == "weighted" and self.frozen_sizes:
            # Every earlier bank starts at its full weight, where gate scope "bank" leaves it.
            self.moram_gain[name] = nn.Parameter(torch.ones(len(self.frozen_sizes), device=device))
        self._table_banks()

    def _table_banks(self) -> None:
        name = self.active_adapters[0]
        sizes = self.frozen_sizes + ([self.moram_A[name].shape[0]] if name in self.moram_A else [])
        table = torch.full((len(sizes), max(sizes, default=0)), -1, dtype=torch.long)
        for row, (start, size) in enumerate(zip(itertools.accumulate([0] + sizes), sizes)):
            table[row, :size] = torch.arange(start, start + size)
        self.bank_table = table.to(self.get_base_layer().weight.device)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        if self.router is not None and self.router.measuring and self.router.reads_inputs:
            # The task router's first pass: the bare model, read layer by layer (the first blocks only).
            if self.prototypes is not None:
                self.router.observe(x, self.prototypes)
            return result
        A, B = self._ranks()
        if A is None:
            return result
        z = F.linear(self.dropout(x).to(A.dtype), A)
        if self.config.gate != "moram":
            return result.add_(F.linear(z, B).to(result.dtype))
        indices, g = self._gate(z)
        if indices is None or B.shape[1] < GATHER_RANKS_PER_KEPT[torch.is_grad_enabled()] * indices.shape[-1]:
            return result.add_(F.linear(spread(z, indices, g) * z, B).to(result.dtype))
        return result.add_(mix_values(B, indices, g * z.gather(-1, indices)).to(result.dtype))

    def _ranks(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Keys (R×d_in) and values (d_out×R) of every rank, frozen then trainable: R is small next to the tokens of a
        batch, so joining them costs little, and the gate and the mix then run once over all ranks."""
        name = self.active_adapters[0]
        if self.learns_alone:
            return self.moram_A[name], self.moram_B[name]
        parts = [(d_A[name], d_B[name]) for d_A, d_B in ((self.moram_A_frozen, self.moram_B_frozen), (self.moram_A, self.moram_B))
                 if name in d_A]
        if len(parts) < 2:
            return parts[0] if parts else (None, None)
        return torch.cat([A for A, _ in parts]), torch.cat([B for _, B in parts], dim=1)

    def _gate(self, z: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        threshold = 0.0 if self.training else self.config.threshold
        router = self.router if self.router is not None and self.router.routes(self.training) else None
        if router is not None and router.measuring:
            router.add_scores(z, self.bank_table)
        member = router.member(self.group_member, z.dim()) if router is not None and not router.measuring else None
        if self.config.gate_scope != "all" and not self.learns_alone:
            indices, g = kept_per_bank(z, self.config.k, self.config.temperature, threshold, member, self.bank_table)
        else:
            indices, g = kept_ranks(z, self.config.k, self.config.temperature, threshold, member)
        # The router's measuring pass is not an answer; only the gates that shape the output are observed.
        if self.gate_observer is not None and not (router is not None and router.measuring):
            self.gate_observer(spread(z, indices, g))
        if self.config.gate_scope == "weighted":
            g = self._weigh_banks(g, router)
        return indices, g

    def _weigh_banks(self, g: torch.Tensor, router: SourceRouter | None) -> torch.Tensor:
        """Each bank's kept gate weights (`g`, bank after bank) times the answering task's gain for that bank: per
        sequence the routed task's row of gains, in training and unrouted passes the newest bank's."""
        table = self._gain_rows()
        if router is not None and not router.measuring:
            weights = table.index_select(0, router.chosen.to(table.device))
            weights = weights.view(weights.shape[0], *[1] * (g.dim() - 2), weights.shape[1])
        else:
            weights = table[-1]
        return (g.unflatten(-1, (table.shape[0], -1)) * weights.unsqueeze(-1).to(g.dtype)).flatten(-2)

    def _gain_rows(self) -> torch.Tensor:
        """The gain table of every bank, the trainable one's row (its gains, 1 for itself) below the frozen banks'."""
        name = self.active_adapters[0]
        if name not in self.moram_A:
            return self.gain_table
        gains = self.moram_gain[name] if name in self.moram_gain else self.gain_table.new_zeros(0)
        row = torch.cat([gains, gains.new_ones(1)])
        return torch.cat([F.pad(self.gain_table, (0, 1)), row[None]])

    def __repr__(self) -> str:
        return f"moram.{super().__repr__()}"
