"""`MoramLayer`: a linear layer plus a growing bank of gated rank-1 experts."""

from __future__ import annotations

from collections.abc import Callable

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features
from torch import nn
from torch.nn import functional as F

from moram_cli.tuner.config import MoramConfig
from moram_cli.tuner.gating import rank_gate
from moram_cli.tuner.keys import kaiming_keys
from moram_cli.tuner.routing import SourceRouter


class MoramLayer(nn.Module, BaseTunerLayer):
    """Wraps `base_layer`; adds `B (g ⊙ z)` with `z = A x` over all ranks.

    Ranks of earlier tasks live in the frozen buffers `moram_A_frozen` /
    `moram_B_frozen`, stacked once when the memory is loaded; the ranks being
    trained live in the parameters `moram_A` / `moram_B`. The gate runs over
    both together, so a new task can reuse old experts.
    """

    adapter_layer_names = ("moram_A", "moram_B")
    other_param_names = ("moram_A_frozen", "moram_B_frozen")
    # Receives every gate `g` this layer computes; set only while gate statistics are collected
    # (see moram_cli.inspection.gates), so the ordinary forward pass pays one `is None` test.
    gate_observer: Callable[[torch.Tensor], None] | None = None
    # Set on the layers of a source-routed merged store (see moram_cli.tuner.routing): the router and this
    # layer's rank indices, one tensor per source and one per bank.
    router: SourceRouter | None = None
    rank_groups: tuple[torch.Tensor, ...] = ()
    rank_banks: tuple[torch.Tensor, ...] = ()
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
        self.moram_A_frozen = BufferDict(persistent=True)
        self.moram_B_frozen = BufferDict(persistent=True)
        self.config = config
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self._active_adapter = adapter_name
        self.merged_adapters = []

    @property
    def frozen_ranks(self) -> int:
        name = self.active_adapters[0]
        return self.moram_A_frozen[name].shape[0] if name in self.moram_A_frozen else 0

    def set_frozen(self, A: torch.Tensor, B: torch.Tensor) -> None:
        """Install the stacked ranks of all earlier tasks (`A`: R×d_in, `B`: d_out×R)."""
        expected = ((A.shape[0], self.in_features), (self.out_features, A.shape[0]))
        if (tuple(A.shape), tuple(B.shape)) != expected:
            raise ValueError(f"bank shapes A{tuple(A.shape)} B{tuple(B.shape)} do not fit this layer, expected A{expected[0]} B{expected[1]}")
        device = self.get_base_layer().weight.device
        name = self.active_adapters[0]
        self.moram_A_frozen[name] = A.detach().to(device=device, dtype=torch.float32)
        self.moram_B_frozen[name] = B.detach().to(device=device, dtype=torch.float32)

    def add_ranks(self, r: int, generator: torch.Generator | None = None, keys: torch.Tensor | None = None) -> None:
        """Append `r` trainable experts, values zero (output unchanged): their keys are `keys` (at most `r` rows),
        the rest drawn like `nn.Linear` weights from `generator`."""
        given = keys if keys is not None else torch.zeros(0, self.in_features)
        A = torch.cat([given.float().cpu(), kaiming_keys(r - given.shape[0], self.in_features, generator)])
        device = self.get_base_layer().weight.device
        name = self.active_adapters[0]
        self.moram_A[name] = nn.Parameter(A.to(device))
        self.moram_B[name] = nn.Parameter(torch.zeros(self.out_features, r, device=device))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        if self.router is not None and self.router.measuring and self.router.reads_inputs:
            # The task router's first pass: the bare model, read layer by layer.
            self.router.observe(x, self.prototypes)
            return result
        name = self.active_adapters[0]
        A_parts = [d[name] for d in (self.moram_A_frozen, self.moram_A) if name in d]
        if not A_parts:
            return result
        B_parts = [d[name] for d in (self.moram_B_frozen, self.moram_B) if name in d]
        h = self.dropout(x).to(A_parts[0].dtype)
        z_parts = [F.linear(h, A) for A in A_parts]
        z = torch.cat(z_parts, dim=-1) if len(z_parts) > 1 else z_parts[0]
        weighted = self._gated(z) if self.config.gate == "moram" else z
        outputs = [F.linear(w, B) for w, B in zip(weighted.split([B.shape[1] for B in B_parts], dim=-1), B_parts)]
        return result + sum(outputs).to(result.dtype)

    def _gated(self, z: torch.Tensor) -> torch.Tensor:
        threshold = 0.0 if self.training else self.config.threshold
        if self.router is None or not self.router.routes(self.training):
            g = rank_gate(z, self.config.k, self.config.temperature, threshold)
        else:
            g = self.router.gate(z, self.rank_groups, self.rank_banks, self.config.k, self.config.temperature, threshold)
        # The router's measuring pass is not an answer; only the gates that shape the output are observed.
        if self.gate_observer is not None and not (self.router is not None and self.router.measuring):
            self.gate_observer(g)
        return g * z

    def __repr__(self) -> str:
        return f"moram.{super().__repr__()}"
