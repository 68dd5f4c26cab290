"""Source routing: a merged store answers each sequence with the memory of one of its source stores.

Banks trained in separate stores never competed in one gate, so after a merge
the experts of one store also win tokens of the other's task (on SmolLM2, a
dbpedia + amazon merge lost 5 and 8 points against its sources). The sources'
own experts still tell their tasks apart once the whole sequence and network
are heard. A first pass with the ordinary gate scores every bank by its best
expert's score normalised within the bank (scale-free), averaged over the
sequence's tokens and all adapted modules; a source scores as its best bank.
The real pass then gates each sequence within the winning source only, which
is exactly that source store's gate. Banks, not whole sources, are scored
because a normalised maximum falls as ranks are added: scored whole, a
two-bank source lost every input to a one-bank source.
"""

from __future__ import annotations

import torch
from torch import nn

from moram_cli.tuner.gating import rank_gate


class SourceRouter:
    """Picks one rank group (a source's banks) per sequence; layers then gate within it (see `gate`).

    `members[g]` lists the banks of group g: a bank two sources share is in
    both. Each layer passes its own rank-index tensors, per group and per
    bank, into its stacked ranks. A forward call that continues a cached
    sequence keeps the choice made on its prompt.
    """

    def __init__(self, members: list[list[int]], banks: int) -> None:
        self.members = members
        self.banks = banks
        self.measuring = False
        self.chosen: torch.Tensor | None = None
        self._scores: torch.Tensor | None = None
        self._mask: torch.Tensor | None = None

    def attach(self, model: nn.Module) -> None:
        model.register_forward_pre_hook(self._before_forward, with_kwargs=True)

    def gate(self, z: torch.Tensor, groups: tuple[torch.Tensor, ...], banks: tuple[torch.Tensor, ...], k: int, temperature: float,
             threshold: float) -> torch.Tensor:
        """The gate of `z` (batch first, ranks last): MoRAM's own while measuring, else within each sequence's group."""
        if self.measuring:
            self._add_scores(z, banks)
            return rank_gate(z, k, temperature, threshold)
        chosen = self.chosen.to(z.device).view(-1, *[1] * (z.dim() - 1))
        g = torch.zeros_like(z)
        for index, ranks in enumerate(groups):
            inside = rank_gate(z.index_select(-1, ranks), k, temperature, threshold)
            g.index_add_(-1, ranks, inside * (chosen == index).to(z.dtype))
        return g

    def _add_scores(self, z: torch.Tensor, banks: tuple[torch.Tensor, ...]) -> None:
        mask = self._mask.to(z.dtype)
        for index, ranks in enumerate(banks):
            if ranks.numel() == 0:  # pruning may leave a bank without ranks in a module
                continue
            part = z.index_select(-1, ranks)
            best = (part / part.norm(dim=-1, keepdim=True).clamp_min(1e-8)).amax(-1).flatten(1)
            self._scores[:, index] += (best * mask).sum(-1) / mask.sum(-1).clamp_min(1)

    def _before_forward(self, model: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.measuring:
            return
        tokens = kwargs.get("input_ids", args[0] if args else None)
        if tokens is None:
            tokens = kwargs["inputs_embeds"][..., 0]
        cache = kwargs.get("cache", kwargs.get("past_key_values"))  # transformers 5 renamed past_key_values
        if cache is not None and cache.get_seq_length() > 0:
            # A prompt's cache repeated for several continuations (ranked choice) carries its choice along.
            self.chosen = self.chosen.repeat_interleave(tokens.shape[0] // self.chosen.shape[0])
            return
        mask = kwargs.get("attention_mask")
        self._mask = mask if mask is not None and mask.dim() == 2 else torch.ones(tokens.shape[:2], device=tokens.device)
        self._scores = torch.zeros(tokens.shape[0], self.banks, device=tokens.device)
        self.measuring = True
        try:
            with torch.no_grad():
                fresh = {key: None for key in ("cache", "past_key_values", "labels") if key in kwargs}
                model(*args, **{**kwargs, **fresh, "use_cache": False, "logits_to_keep": 1})
        finally:
            self.measuring = False
        self.chosen = torch.stack([self._scores[:, banks].amax(-1) for banks in self.members], dim=-1).argmax(-1)
