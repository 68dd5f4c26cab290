"""`SeqLoraModel`: PEFT's own LoRA behind the memory interface of `MoramModel` (the SeqLoRA baseline)."""

from __future__ import annotations

import torch
from peft import LoraModel
from peft.tuners.lora import LoraLayer
from torch import nn

from moram_cli.tuner.model import BankTensors

ADAPTER = "default"


class SeqLoraModel(LoraModel):
    """One standard LoRA adapter that goes on training, task after task.

    A bank holds the whole adapter as it was after its task (`A`: r×d_in,
    `B`: d_out×r, the layout of a MoRAM bank), so `set_memory` loads one bank,
    the newest wanted, and `add_task_ranks` makes that adapter trainable again
    instead of adding ranks. The method names are `MoramModel`'s, so loading,
    training and evaluation run the same code for every method.
    """

    def moram_layers(self) -> dict[str, LoraLayer]:
        """Adapted layers by their module name in the base model, in model order."""
        return {name: m for name, m in self.model.named_modules() if isinstance(m, LoraLayer)}

    def set_memory(self, bank: BankTensors) -> None:
        """Load the adapter of one bank: module name -> (A, B)."""
        layers = self.moram_layers()
        if set(layers) != set(bank):
            raise ValueError(f"memory and model disagree on adapted modules, e.g. {sorted(set(layers) ^ set(bank))[0]}")
        with torch.no_grad():
            for name, (A, B) in bank.items():
                layers[name].lora_A[ADAPTER].weight.copy_(A)
                layers[name].lora_B[ADAPTER].weight.copy_(B)

    def add_task_ranks(self, r: int, seed: int) -> list[nn.Parameter]:
        """The adapter's parameters, made trainable; nothing is added.

        `r` is the store's, fixed when PEFT injected the adapter, and so were
        the first task's keys (PEFT's initialisation, drawn under learn-task's
        seed); later tasks start from the previous task's adapter.
        """
        for p in self.model.parameters():
            p.requires_grad_(False)
        params = [p for layer in self.moram_layers().values() for p in (layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight)]
        for p in params:
            p.requires_grad_(True)
        return params

    def gain_parameters(self) -> list[nn.Parameter]:
        """None: a LoRA adapter has no banks to weigh (see `MoramModel.gain_parameters`)."""
        return []

    def task_gains(self) -> dict[str, torch.Tensor]:
        return {}

    def task_ranks(self) -> BankTensors:
        """The whole adapter: module name -> (A, B), detached on CPU."""
        return {
            module: (layer.lora_A[ADAPTER].weight.detach().cpu(), layer.lora_B[ADAPTER].weight.detach().cpu())
            for module, layer in self.moram_layers().items()
        }
