"""Routing: a store answers each sequence with one group of its banks, picked by a first pass over the sequence.

Source routing (`SourceRouter`): a merged store answers each sequence with the memory of one of its source stores.

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

Task routing (`TaskRouter`): a store learned task after task answers each
sequence with its banks up to the task the sequence resembles most, i.e. as
the store was right after learning that task, so later tasks cannot take
over an earlier task's inputs. Gate scores cannot tell the tasks apart here
(a later bank trained against the earlier ones outscored them on every
task's text); the inputs can. Each bank records its task's prototype, the
mean input of its tokens to every adapted module on the bare base model; the
first pass runs the bare model and picks the bank whose prototypes are
nearest (squared distance summed over the modules) to the sequence's mean
inputs. Routing acts at inference only: training gates over every rank (under gate scope "task", over the new bank's alone).
The first pass reads the modules of the first `ROUTING_BLOCKS` blocks only
and stops there, so it costs a few blocks of the model, not a whole pass.
"""

from __future__ import annotations

import re

import torch
from torch import nn

# Blocks whose inputs the task router reads. On the eight-task SmolLM2 store of the long benchmark (seed 0, 32 test
# prompts per task) the first 4 of 30 blocks picked the prompt's own task for 97.7% of prompts, all 30 for 96.9%
# (2 blocks: 96.9%, 1 block: 83.6%).
ROUTING_BLOCKS = 4


class PassSeen(Exception):
    """Raised by an observer inside the model once it has seen all it needs of a batch (the task router's first pass,
    the data-key pass): the rest of the model's pass is skipped."""


def block_index(name: str) -> int | None:
    """The block a module belongs to: the first number in its name, as 3 in `model.layers.3.self_attn.q_proj`."""
    found = re.search(r"\.(\d+)\.", f".{name}.")
    return int(found.group(1)) if found else None


def routing_modules(names: list[str]) -> list[str]:
    """The adapted modules the task router reads: those of the first ROUTING_BLOCKS blocks; all of them in a model
    without numbered blocks."""
    blocks = {name: block_index(name) for name in names}
    if None in blocks.values():
        return names
    return [name for name in names if blocks[name] < ROUTING_BLOCKS]


class SourceRouter:
    """Picks one rank group (a source's banks) per sequence; layers then gate within it (see `member`).

    `members[g]` lists the banks of group g: a bank two sources share is in
    both. Each layer holds its own table of which of its stacked ranks each
    group has. A forward call that continues a
    cached sequence keeps the choice made on its prompt.
    """

    # Whether the first pass runs the bare base model and reads each adapted layer's input (`observe`) instead of
    # scoring banks by their experts' gate scores.
    reads_inputs = False
    # How many layers observe in the first pass (those holding prototypes), and how many have not yet in this one.
    readers = 0
    unseen = 0

    def __init__(self, members: list[list[int]], banks: int) -> None:
        self.members = members
        self.banks = banks
        # Off while a task's statistics are collected on the store's full memory (moram_cli.training.key_init).
        self.enabled = True
        self.measuring = False
        self.chosen: torch.Tensor | None = None
        self._scores: torch.Tensor | None = None
        self._mask: torch.Tensor | None = None

    def attach(self, model: nn.Module) -> torch.utils.hooks.RemovableHandle:
        return model.register_forward_pre_hook(self._before_forward, with_kwargs=True)

    def routes(self, training: bool) -> bool:
        """Whether the gate routes now: at inference, unless switched off."""
        return self.enabled and not training

    def member(self, group_member: torch.Tensor, dims: int) -> torch.Tensor:
        """Which of a layer's ranks (`group_member`: groups × ranks) each sequence's chosen group holds, shaped to
        broadcast over projections of `dims` dimensions (batch first, ranks last)."""
        rows = group_member.index_select(0, self.chosen.to(group_member.device))
        return rows.view(rows.shape[0], *[1] * (dims - 2), rows.shape[1])

    def add_scores(self, z: torch.Tensor, banks: torch.Tensor) -> None:
        """The measuring pass: add each bank's best normalised expert score, averaged over the sequence's tokens.
        `banks` is the layer's table of rank indices per bank, padded with -1."""
        inside = banks >= 0
        part = z[..., banks.clamp_min(0)] * inside
        best = (part / part.norm(dim=-1, keepdim=True).clamp_min(1e-8)).masked_fill(~inside, float("-inf")).amax(-1)
        # Pruning may leave a bank without ranks in a module: it scores nothing there.
        best = torch.where(inside.any(-1), best, 0.0).flatten(1, -2)
        mask = self._mask.to(z.dtype)
        self._scores += (best * mask.unsqueeze(-1)).sum(1) / mask.sum(-1, keepdim=True).clamp_min(1)

    def _before_forward(self, model: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.measuring or not self.routes(model.training):
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
        self.unseen = self.readers
        try:
            with torch.no_grad():
                fresh = {key: None for key in ("cache", "past_key_values", "labels") if key in kwargs}
                model(*args, **{**kwargs, **fresh, "use_cache": False, "logits_to_keep": 1})
        except PassSeen:
            pass
        finally:
            self.measuring = False
        self.chosen = torch.stack([self._scores[:, banks].amax(-1) for banks in self.members], dim=-1).argmax(-1)


class TaskRouter(SourceRouter):
    """Picks, per sequence, the banks up to the one whose task prototypes are nearest to the sequence's inputs, or that
    bank alone (`alone`: each task was learned without the others, gate scope "task").

    The groups are the store's prefixes (banks 1..b); a prefix scores as its
    best bank, and ties go to the shortest, so the choice is the prefix ending
    at the nearest bank. Each layer passes its own prototypes (banks × d_in).
    """

    reads_inputs = True

    def __init__(self, banks: int, alone: bool = False) -> None:
        super().__init__([[b] if alone else list(range(b + 1)) for b in range(banks)], banks)

    def observe(self, x: torch.Tensor, prototypes: torch.Tensor) -> None:
        """Score every bank by minus the squared distance of the sequence's mean input `x` (batch first) to its prototype."""
        mask = self._mask.to(x.dtype).unsqueeze(-1)
        mean = (x * mask).sum(1) / mask.sum(1).clamp_min(1)
        self._scores -= torch.cdist(mean.float(), prototypes.to(device=x.device, dtype=torch.float32)).square()
        self.unseen -= 1
        if self.unseen == 0:
            raise PassSeen


def group_table(members: list[list[int]], banks: torch.Tensor) -> torch.Tensor:
    """groups × ranks: whether each of a layer's ranks belongs to each group (`members[g]`: group g's banks; `banks`:
    the layer's rank indices per bank, padded with -1), built once when the store is routed."""
    table = torch.zeros(len(members), int((banks >= 0).sum()), dtype=torch.bool, device=banks.device)
    for row, group in zip(table, members):
        ranks = banks[group]
        row[ranks[ranks >= 0]] = True
    return table
