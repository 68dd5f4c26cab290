"""The baselines lora (SeqLoRA) and inclora (IncLoRA) on the code path MoRAM uses: same store, training and evaluation."""

from __future__ import annotations

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import random_bank
from moram_cli.models.memory import build_memory_model
from moram_cli.store import MemoryStore
from test_cli import ok_json
from test_errors import fails_cleanly

Q0 = "model.layers.0.self_attn.q_proj"


@pytest.fixture
def method_store(tmp_path, tiny_model_dir):
    """`method_store(method)`: an empty store of that method on the tiny model, 4 ranks per task."""

    def make(method: str):
        path = tmp_path / method
        ok_json("init", path, "--base-model", tiny_model_dir, "--r", "4", "--k", "2", "--temperature", "0.1", "--method", method)
        return path

    return make


@pytest.mark.parametrize("method", ["moram", "lora", "inclora"])
def test_every_method_learns_the_same_number_of_parameters(method_store, tiny_task, method):
    store = method_store(method)
    result = ok_json("learn-task", store, "--data", tiny_task.train, "--lr", "1e-2", "--epochs", "2", "--batch-size", "4")
    assert result["loss"]["last"] < result["loss"]["first"]
    # r x (d_in + d_out) per adapted module: q_proj 32 -> 32 and k_proj 32 -> 16, in two layers
    assert result["trainable_parameters"] == 2 * 4 * (32 + 32) + 2 * 4 * (32 + 16)
    config = yaml.safe_load((store / "store.yaml").read_text())
    assert config["method"] == method and config["adapter"]["lora_alpha"] == (4.0 if method == "lora" else None)


def test_inclora_adds_every_bank_at_full_weight_folded_into_the_base_and_trains_only_the_new_ranks(method_store):
    store = MemoryStore.open(method_store("inclora"))
    banks = [random_bank(4, 1), random_bank(4, 2)]
    for name, tensors in zip(("one", "two"), banks):
        store.add_bank(name, tensors, {})
    bare = build_memory_model(store, upto=0)[0].moram_layers()[Q0].base_layer
    model, _ = build_memory_model(store)
    layer = model.moram_layers()[Q0]
    x = torch.randn(3, 32)
    expected = bare(x) + sum(x @ A.T @ B.T for A, B in (bank[Q0] for bank in banks))
    torch.testing.assert_close(layer(x), expected)
    # the frozen ranks live in the base weight now: inference pays for no rank
    assert "default" not in layer.moram_A_frozen
    folded = layer.base_layer.weight.clone()
    params = model.add_task_ranks(4, seed=0)
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in params}
    ids = torch.randint(0, 300, (2, 6))
    model(input_ids=ids, labels=ids).loss.backward()
    torch.optim.AdamW(params, lr=1e-2).step()
    assert torch.equal(layer.base_layer.weight, folded) and layer.moram_B["default"].abs().sum() > 0


def test_a_lora_bank_holds_the_whole_adapter_after_its_task(method_store, tiny_task):
    store = method_store("lora")
    train = ("--data", tiny_task.train, "--eval-data", tiny_task.test, "--lr", "1e-2", "--epochs", "2", "--batch-size", "4")
    first = ok_json("learn-task", store, *train, "--name", "one")
    second = ok_json("learn-task", store, *train, "--name", "two")
    # bank N alone rebuilds the model as it was after task N: the accuracy measured then comes back
    assert ok_json("eval", store, "--data", tiny_task.test, "--upto", "1")["accuracy"] == first["eval"]["accuracy"]
    assert ok_json("eval", store, "--data", tiny_task.test)["accuracy"] == second["eval"]["accuracy"]
    model, _ = build_memory_model(MemoryStore.open(store), upto=1)
    bank = load_file(store / "banks" / "001-one" / "weights.safetensors")
    assert torch.equal(model.moram_layers()[Q0].lora_A["default"].weight, bank[f"{Q0}.A"])


def test_lora_trains_on_from_the_previous_tasks_adapter(method_store, tiny_task):
    store = method_store("lora")
    ok_json("learn-task", store, "--data", tiny_task.train, "--name", "one", "--lr", "1e-2", "--epochs", "2", "--batch-size", "4")
    # a learning rate of ~0 leaves the adapter where task one left it
    ok_json("learn-task", store, "--data", tiny_task.train, "--name", "two", "--lr", "1e-12", "--epochs", "0.5")
    one, two = (load_file(store / "banks" / b / "weights.safetensors") for b in ("001-one", "002-two"))
    assert all(torch.allclose(one[key], two[key], atol=1e-6) for key in one) and one[f"{Q0}.B"].abs().sum() > 0


def test_unknown_methods_and_gate_statistics_of_baselines_are_refused(tmp_path, tiny_model_dir, method_store, tiny_task):
    fails_cleanly(["init", tmp_path / "x", "--base-model", tiny_model_dir, "--method", "ewc"], expect="unknown --method 'ewc'")
    store = method_store("inclora")
    MemoryStore.open(store).add_bank("one", random_bank(4, 1), {})
    fails_cleanly(["inspect-ranks", store, "--data", tiny_task.test], store, expect="has no gate to measure")
