"""The keys a task's new experts start from, by the store's `key_init` (the math is in moram_cli.tuner.keys), and
the prototype a task-routed store's bank records of its task.

`kaiming` draws them at random, as the method is written; `warm` copies the
previous bank's keys (what the authors' LLM code effectively trained from);
`data` runs the model, with its memory as it stands, over a sample of the new
task's training examples and takes its keys from each adapted layer's inputs.
A first task always starts from `kaiming` keys: no trained key competes with
them yet, and there is no previous bank.
"""

from __future__ import annotations

import random

import torch
from accelerate import Accelerator

from moram_cli.data.encode import Encoded
from moram_cli.models.token_passes import PassSeen, masked_passes
from moram_cli.store import MemoryStore
from moram_cli.training.distributed import main_value, whole_model
from moram_cli.progress import phase_progress
from moram_cli.tuner import MoramModel
from moram_cli.tuner.keys import InputMoments, data_keys
from moram_cli.tuner.routing import routing_modules

# Examples whose inputs make `data` keys and task prototypes: the moments of 64 examples' tokens (a few thousand) settle the leading
# directions of a 576-wide layer, and the pass costs a few seconds on CPU.
DATA_KEY_EXAMPLES = 64


def initial_keys(store: MemoryStore, model: MoramModel, encoded: list[Encoded], pad_id: int, batch_size: int, seed: int,
                 accelerator: Accelerator, show_progress: bool) -> dict[str, torch.Tensor] | None:
    """Module name -> the new task's starting keys; None where they are drawn at random (`kaiming`, or a first task).

    Every process computes them and then takes the main process's, so all start from identical keys.
    """
    banks, mode = store.banks(), store.config.adapter.key_init
    if mode == "kaiming" or not banks:
        return None
    if mode == "warm":
        return {module: A for module, (A, _) in banks[-1].tensors().items()}
    with model.unrouted(), whole_model(accelerator, model):
        moments = input_moments(model, data_sample(encoded, seed), pad_id, batch_size, "data keys", show_progress and accelerator.is_main_process)
    old = model.frozen_keys()
    keys = {module: data_keys(m, old[module], store.config.adapter.r) for module, m in moments.items()}
    return main_value(accelerator, keys)


def task_prototypes(model: MoramModel, encoded: list[Encoded], pad_id: int, batch_size: int, seed: int, accelerator: Accelerator,
                    show_progress: bool, modules: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Module name -> the new task's prototype there (moram_cli.tuner.routing): the mean input of its tokens on the bare
    base model, for `modules`; by default those the task router reads (the first blocks: the pass stops after them)."""
    model.disable_adapter_layers()
    try:
        with model.unrouted(), whole_model(accelerator, model):
            moments = input_moments(model, data_sample(encoded, seed), pad_id, batch_size, "task prototype",
                                    show_progress and accelerator.is_main_process, second=False,
                                    modules=modules or routing_modules(list(model.moram_layers())))
    finally:
        model.enable_adapter_layers()
    return main_value(accelerator, {module: (m.total / max(m.tokens, 1)).float() for module, m in moments.items()})


def data_sample(encoded: list[Encoded], seed: int) -> list[Encoded]:
    """The examples, drawn by `seed`, whose inputs a task's keys and prototype come from."""
    return [encoded[i] for i in sorted(random.Random(seed).sample(range(len(encoded)), min(DATA_KEY_EXAMPLES, len(encoded))))]


def input_moments(model: MoramModel, encoded: list[Encoded], pad_id: int, batch_size: int, label: str, show_progress: bool,
                  second: bool = True, modules: list[str] | None = None) -> dict[str, InputMoments]:
    """Each adapted layer's input moments (the second one unless `second` is off) over the (unpadded) tokens of
    `encoded`; only the layers in `modules` where given, and each batch's pass stops once they have all been read.

    Layers that read one tensor (a block's q, k and v projections) share one moment object, summed once.
    """
    layers = model.moram_layers()
    names = list(layers) if modules is None else modules
    moments = {module: InputMoments(layers[module].in_features, second) for module in names}
    current = {}

    def observe(module: str):
        def hook(layer, args):
            x, (last, reader) = args[0], current["last"]
            if x is last:
                moments[module] = moments[reader]
            else:
                current["last"] = (x, module)
                moments[module].add(x.flatten(0, -2)[current["tokens"]])
            current["unread"] -= 1
            if current["unread"] == 0:
                raise PassSeen
        return hook

    hooks = [layers[module].register_forward_pre_hook(observe(module)) for module in names]
    try:
        with phase_progress(show_progress) as progress:
            bar = progress.add_task(label, total=-(-len(encoded) // batch_size))
            masked_passes(model, encoded, pad_id, batch_size, lambda mask: current.update(tokens=mask, last=(None, None), unread=len(names)),
                          lambda: progress.advance(bar))
    finally:
        for hook in hooks:
            hook.remove()
    return moments
