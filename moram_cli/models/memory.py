"""A store's memory on top of its base model: the model every command runs."""

from __future__ import annotations

import torch
from peft import LoraConfig
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from moram_cli.errors import MoramError
from moram_cli.models.loading import load_base_model
from moram_cli.store import Bank, MemoryStore
from moram_cli.store.bank import GAINS, MISSING_GAINS, MISSING_GROUPS, MISSING_PROTOTYPES, BankTensors, routing_groups
from moram_cli.store.config import GATE_SCOPES, KEY_INITS, METHODS, ROUTINGS
from moram_cli.tuner import MoramConfig, MoramModel, SeqLoraModel
from moram_cli.tuner.routing import routing_modules

MemoryModel = MoramModel | SeqLoraModel


def adapter_model(base: PreTrainedModel, store: MemoryStore) -> MemoryModel:
    """The store's method on `base`: gated MoRAM layers, the same layers without a gate (inclora), or PEFT's LoRA (lora)."""
    a, method = store.config.adapter, store.config.method
    if method not in METHODS:
        raise MoramError(f"{store.path}: store method {method!r} is unknown to this moram (it knows {', '.join(METHODS)}); upgrade moram")
    if a.routing not in ROUTINGS or (a.routing != "token" and method != "moram"):
        raise MoramError(f"{store.path}: store routing {a.routing!r} does not go with method {method}; the store config is corrupt, restore it from a backup")
    if a.key_init not in KEY_INITS:
        raise MoramError(f"{store.path}: store key_init {a.key_init!r} is unknown to this moram (it knows {', '.join(KEY_INITS)}); upgrade moram")
    if a.gate_scope not in GATE_SCOPES:
        raise MoramError(f"{store.path}: store gate_scope {a.gate_scope!r} is unknown to this moram (it knows {', '.join(GATE_SCOPES)}); upgrade moram")
    if method == "lora":
        return SeqLoraModel(base, LoraConfig(r=a.r, lora_alpha=a.lora_alpha, lora_dropout=a.dropout, target_modules=a.target_modules), "default")
    config = MoramConfig(r=a.r, k=a.k, temperature=a.temperature, threshold=a.threshold, dropout=a.dropout,
                         target_modules=a.target_modules, gate="none" if method == "inclora" else "moram", gate_scope=a.gate_scope)
    return MoramModel(base, config, "default")


def stack_banks(per_bank: list[BankTensors]) -> BankTensors:
    """Module name -> (A, B) of several banks stacked along the rank axis, oldest first: the memory a model holds."""
    if not per_bank:
        return {}
    return {
        module: (torch.cat([t[module][0] for t in per_bank]), torch.cat([t[module][1] for t in per_bank], dim=1))
        for module in per_bank[0]
    }


def build_memory_model(
    store: MemoryStore, upto: int | None = None, trust_remote_code: bool = False
) -> tuple[MemoryModel, PreTrainedTokenizerBase]:
    """Base model + the store's adapter holding the first `upto` banks (all by default), frozen."""
    banks = store.banks()
    if upto is not None and not 0 <= upto <= len(banks):
        raise MoramError(f"{store.path}: --upto {upto} is out of range; the store has {len(banks)} bank(s)")
    base, tokenizer = load_base_model(store.config.base_model, store.config.dtype, trust_remote_code)
    model = adapter_model(base, store)
    if not model.moram_layers():
        raise MoramError(f"{store.path}: target modules {store.config.adapter.target_modules} match no layer of the base model; create the store with other --target-modules")
    per_bank = [bank.tensors() for bank in banks[:upto]]
    for bank, tensors in zip(banks, per_bank):
        check_bank_fits(bank, tensors, model)
    if per_bank:
        # A lora bank is the whole adapter after its task, so the newest one wanted supersedes the others.
        if store.config.method == "lora":
            model.set_memory(per_bank[-1])
        else:
            gains = gain_tables(banks[:upto], list(per_bank[0])) if store.config.adapter.gate_scope == "weighted" else None
            model.set_memory(stack_banks(per_bank), rank_counts(per_bank), gains)
    if per_bank and store.config.method == "inclora":
        # Ungated frozen ranks always add their whole B A x: folded into the base weight, they cost nothing per token.
        model.fold_frozen()
    if per_bank and store.config.adapter.routing == "source":
        members = group_members(bank_groups(banks[:upto]))
        if len(members) > 1:
            model.route_by_source(members)
    if store.config.adapter.routing == "task" and len(per_bank) > 1:
        route_by_task(model, bank_prototypes(banks[:upto]))
    # Freshly injected layers start in training mode, which would skip the inference-only threshold.
    model.eval()
    return model, tokenizer


def bank_groups(banks: list[Bank]) -> list[list[int]]:
    """Each bank's routing groups as `moram merge` recorded them."""
    recorded = [routing_groups(bank.metadata()) for bank in banks]
    for bank, groups in zip(banks, recorded):
        if groups is None:
            raise MoramError(f"{bank.path}: {MISSING_GROUPS}")
    return recorded


def group_members(groups: list[list[int]]) -> list[list[int]]:
    """The banks (by position) of each group present; `--upto` may have left some recorded groups without banks."""
    return [[i for i, tag in enumerate(groups) if group in tag] for group in sorted(set().union(*groups))]


def bank_prototypes(banks: list[Bank]) -> list[dict[str, torch.Tensor]]:
    """Each bank's task prototypes, which a task-routed store's learn-task records."""
    prototypes = [bank.prototypes() for bank in banks]
    for bank, recorded in zip(banks, prototypes):
        if not recorded:
            raise MoramError(f"{bank.path}: {MISSING_PROTOTYPES}")
    return prototypes


def gain_tables(banks: list[Bank], modules: list[str]) -> dict[str, torch.Tensor]:
    """Module name -> banks × banks, row b weighing each bank when the answer is bank b's task: the gains over the banks
    before it that its learn-task recorded (gate scope weighted), 1 for itself, 0 for the banks after it."""
    tables = {module: torch.eye(len(banks)) for module in modules}
    for b, bank in enumerate(banks[1:], start=1):
        gains = bank.extras().get(GAINS, {})
        for module, table in tables.items():
            if module not in gains or tuple(gains[module].shape) != (b,):
                raise MoramError(f"{bank.path}: {MISSING_GAINS}")
            table[b, :b] = gains[module]
    return tables


def route_by_task(model: MoramModel, prototypes: list[dict[str, torch.Tensor]]) -> None:
    """Route each sequence to the banks up to its nearest task (one bank needs no routing)."""
    if len(prototypes) < 2:
        return
    # Banks record the prototypes of the modules the router reads (those of earlier versions, of every module).
    read = routing_modules(list(model.moram_layers()))
    model.route_by_task({module: torch.stack([p[module] for p in prototypes]) for module in read})


def rank_counts(per_bank: list[BankTensors]) -> list[dict[str, int]]:
    """Each bank's number of ranks per module."""
    return [{module: A.shape[0] for module, (A, _) in tensors.items()} for tensors in per_bank]


def check_bank_fits(bank: Bank, tensors: BankTensors, model: MemoryModel) -> None:
    """A bank must hold exactly the adapted modules, with shapes that fit them."""
    layers = model.moram_layers()
    if set(tensors) != set(layers):
        odd = sorted(set(tensors) ^ set(layers))[0]
        raise MoramError(f"{bank.path}: bank does not match the model's adapted modules (e.g. {odd}); it was made for another model or store")
    for module, (A, B) in tensors.items():
        layer = layers[module]
        if A.ndim != 2 or B.ndim != 2 or A.shape[1] != layer.in_features or B.shape != (layer.out_features, A.shape[0]):
            raise MoramError(
                f"{bank.path}: {module} has shapes A{tuple(A.shape)} B{tuple(B.shape)}, the model needs A(r, {layer.in_features}) B({layer.out_features}, r); the bank belongs to another base model"
            )
        if isinstance(model, SeqLoraModel) and A.shape[0] != layer.r["default"]:
            raise MoramError(f"{bank.path}: {module} holds a rank-{A.shape[0]} LoRA adapter, but the store's is rank {layer.r['default']}; the bank comes from another lora store")
