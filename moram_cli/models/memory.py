"""A store's memory on top of its base model: the model every command runs."""

from __future__ import annotations

from peft import LoraConfig
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from moram_cli.errors import MoramError
from moram_cli.models.loading import load_base_model
from moram_cli.store import Bank, MemoryStore
from moram_cli.store.bank import BankTensors, stack_banks
from moram_cli.store.config import METHODS
from moram_cli.tuner import MoramConfig, MoramModel, SeqLoraModel

MemoryModel = MoramModel | SeqLoraModel


def adapter_model(base: PreTrainedModel, store: MemoryStore) -> MemoryModel:
    """The store's method on `base`: gated MoRAM layers, the same layers without a gate (inclora), or PEFT's LoRA (lora)."""
    a, method = store.config.adapter, store.config.method
    if method not in METHODS:
        raise MoramError(f"{store.path}: store method {method!r} is unknown to this moram (it knows {', '.join(METHODS)}); upgrade moram")
    if method == "lora":
        return SeqLoraModel(base, LoraConfig(r=a.r, lora_alpha=a.lora_alpha, lora_dropout=a.dropout, target_modules=a.target_modules), "default")
    config = MoramConfig(r=a.r, k=a.k, temperature=a.temperature, threshold=a.threshold, dropout=a.dropout,
                         target_modules=a.target_modules, gate="none" if method == "inclora" else "moram")
    return MoramModel(base, config, "default")


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
        model.set_memory(per_bank[-1] if store.config.method == "lora" else stack_banks(per_bank))
    # Freshly injected layers start in training mode, which would skip the inference-only threshold.
    model.eval()
    return model, tokenizer


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
