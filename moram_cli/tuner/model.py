"""`MoramModel`: injects `MoramLayer`s into a causal LM by target-module name."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from moram_cli.tuner.config import MoramConfig
from moram_cli.tuner.layer import MoramLayer
from moram_cli.tuner.routing import SourceRouter, TaskRouter, group_table, routing_modules

BankTensors = dict[str, tuple[torch.Tensor, torch.Tensor]]


class MoramModel(BaseTuner):
    """A PEFT `BaseTuner`: PEFT's target matching decides which layers get a memory.

    The memory itself is managed here, not through PEFT adapters: frozen
    banks are installed with `set_memory`, a task's trainable ranks are added
    with `add_task_ranks` and read back with `task_ranks`.
    """

    prefix = "moram_"
    tuner_layer_cls = MoramLayer
    target_module_mapping: dict[str, list[str]] = {}

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs) -> None:
        self._replace_module(parent, target_name, MoramLayer(target, adapter_name, config), target)

    def moram_layers(self) -> dict[str, MoramLayer]:
        """Adapted layers by their module name in the base model, in model order."""
        return {name: m for name, m in self.model.named_modules() if isinstance(m, MoramLayer)}

    def set_memory(self, stacked: BankTensors, counts: list[dict[str, int]] | None = None,
                   gains: dict[str, torch.Tensor] | None = None) -> None:
        """Install the frozen ranks of all earlier tasks: module name -> (A, B) stacks, with each bank's number of ranks
        per module (`counts`, oldest first; one bank when not given) and, under gate scope "weighted", each module's gain
        table (see `MoramLayer.set_frozen`)."""
        layers = self.moram_layers()
        missing = sorted(set(layers) ^ set(stacked))
        if missing:
            raise ValueError(f"memory and model disagree on adapted modules, e.g. {missing[0]}")
        for name, (A, B) in stacked.items():
            layers[name].set_frozen(A, B, [bank[name] for bank in counts] if counts else None, (gains or {}).get(name))

    def fold_frozen(self) -> None:
        """Fold every layer's frozen ranks into its base weight (ungated layers only: see `MoramLayer.fold_frozen`)."""
        for layer in self.moram_layers().values():
            layer.fold_frozen()

    def route_by_source(self, members: list[list[int]]) -> None:
        """Answer each sequence with one group of banks (a source store's): `members[g]` lists group g's banks."""
        self._route(SourceRouter(members, banks=self._banks()), members)

    def route_by_task(self, prototypes: dict[str, torch.Tensor]) -> None:
        """Answer each sequence with the banks up to the task it resembles most (that task's bank alone under gate scope
        "task"): `prototypes` maps each module the router reads to its banks' task prototypes (banks × d_in)."""
        layers = self.moram_layers()
        router = TaskRouter(banks=self._banks(), alone=next(iter(layers.values())).config.gate_scope == "task")
        self._route(router, router.members)
        read = set(routing_modules(list(layers)))
        for name, layer in layers.items():
            layer.prototypes = prototypes[name].to(layer.get_base_layer().weight.device) if name in read else None
        router.readers = len(read)

    @contextmanager
    def unrouted(self) -> Iterator[None]:
        """Every sequence meets every rank meanwhile, as in training."""
        router = next((layer.router for layer in self.moram_layers().values() if layer.router is not None), None)
        if router is None:
            yield
            return
        router.enabled = False
        try:
            yield
        finally:
            router.enabled = True

    def _route(self, router: SourceRouter, members: list[list[int]]) -> None:
        # Routing again (a task-routed store that just learned a task) replaces the earlier router.
        if getattr(self, "_routing_hook", None) is not None:
            self._routing_hook.remove()
        for layer in self.moram_layers().values():
            layer.router, layer.group_member = router, group_table(members, layer.bank_table)
        self._routing_hook = router.attach(self.model)

    def _banks(self) -> int:
        return next(iter(self.moram_layers().values())).bank_table.shape[0]

    def add_task_ranks(self, r: int, seed: int, keys: dict[str, torch.Tensor] | None = None) -> list[nn.Parameter]:
        """Add `r` trainable experts to every adapted layer, starting from `keys` (module name -> at most `r` keys, see
        `MoramLayer.add_ranks`) where given; returns exactly the new parameters."""
        generator = torch.Generator().manual_seed(seed)
        for p in self.model.parameters():
            p.requires_grad_(False)
        params = []
        for module, layer in self.moram_layers().items():
            layer.add_ranks(r, generator, (keys or {}).get(module))
            name = layer.active_adapters[0]
            params += [layer.moram_A[name], layer.moram_B[name]]
        return params + self.gain_parameters()

    def gain_parameters(self) -> list[nn.Parameter]:
        """The trainable bank's gains over the earlier banks (gate scope "weighted"), which train at their own rate."""
        return [gain for layer in self.moram_layers().values() for gain in layer.moram_gain.values()]

    def task_gains(self) -> dict[str, torch.Tensor]:
        """The current task's trained gains over the earlier banks: module name -> gains, detached on CPU (empty unless
        the gate scope is "weighted" and earlier banks exist)."""
        out = {}
        for module, layer in self.moram_layers().items():
            name = layer.active_adapters[0]
            if name in layer.moram_gain:
                out[module] = layer.moram_gain[name].detach().cpu()
        return out

    def frozen_keys(self) -> dict[str, torch.Tensor | None]:
        """Module name -> the keys of every earlier task, stacked (None before the first bank)."""
        out = {}
        for module, layer in self.moram_layers().items():
            name = layer.active_adapters[0]
            out[module] = layer.moram_A_frozen[name] if name in layer.moram_A_frozen else None
        return out

    def task_ranks(self) -> BankTensors:
        """The trained ranks of the current task: module name -> (A, B), detached on CPU."""
        out = {}
        for module, layer in self.moram_layers().items():
            name = layer.active_adapters[0]
            out[module] = (layer.moram_A[name].detach().cpu(), layer.moram_B[name].detach().cpu())
        return out
