"""Task routing (`init --routing task`, the moram default): each input answered by the banks up to its nearest task."""

from __future__ import annotations

import pytest
import torch
import yaml

from conftest import random_bank
from moram_cli.errors import MoramError
from moram_cli.evaluation.continual import continual_report
from moram_cli.models.memory import build_memory_model
from moram_cli.store import MemoryStore
from moram_cli.store.init import init_store
from moram_cli.store.verify import verify_store
from moram_cli.training.learn import learn_task
from test_merge import moram_json

# A second task the tiny model can tell apart from the topic task: other words, another format.
COUNTING = [{"prompt": f"Count on: {' '.join(str(n) for n in range(i, i + 4))}\nNext:", "completion": str(i + 4)} for i in range(24)]


def learn_both(store, tiny_task, counting) -> None:
    """The topic task, then counting, each with its test set."""
    for data, name in ((tiny_task.train, "topic"), (counting, "counting")):
        learn_task(store, data, name=name, eval_data=tiny_task.test if name == "topic" else counting, show_progress=False,
                   batch_size=4, max_steps=6, lr=5e-2)


@pytest.fixture
def routed(new_store, tiny_task, write_jsonl, tmp_path):
    """A task-routed store that learned the topic task, then counting."""
    store = new_store("routed")
    counting = write_jsonl(tmp_path / "counting.jsonl", COUNTING)
    learn_both(store, tiny_task, counting)
    return store, counting


def logits(model, tokenizer, text: str) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits


def nearest_task(model, tokenizer, text: str, prototypes: list[dict[str, torch.Tensor]]) -> int:
    """The bank whose prototypes are nearest to the text's mean inputs on the bare model, computed here independently."""
    means, hooks = {}, []
    for name, layer in model.moram_layers().items():
        hooks.append(layer.register_forward_pre_hook(lambda m, args, name=name: means.__setitem__(name, args[0][0].double().mean(0))))
    model.disable_adapter_layers()
    with model.unrouted():
        logits(model, tokenizer, text)
    model.enable_adapter_layers()
    for hook in hooks:
        hook.remove()
    distances = [sum((means[m] - p[m].double()).square().sum() for m in p) for p in prototypes]
    return min(range(len(distances)), key=distances.__getitem__)


def test_each_input_is_answered_as_the_store_was_after_its_nearest_task(routed, tiny_task):
    store, _ = routed
    opened = MemoryStore.open(store)
    assert opened.config.adapter.routing == "task"
    prototypes = [bank.prototypes() for bank in opened.banks()]
    assert all(p.shape == (32,) for bank in prototypes for p in bank.values())
    full, tokenizer = build_memory_model(opened)
    as_was = [build_memory_model(opened, upto=j)[0] for j in (1, 2)]
    topic = tiny_task.train.read_text().splitlines()[0].split('"prompt": "')[1].split('", "completion"')[0].encode().decode("unicode_escape")
    for text, task in ((topic, 0), (COUNTING[3]["prompt"], 1)):
        assert nearest_task(full, tokenizer, text, prototypes) == task
        torch.testing.assert_close(logits(full, tokenizer, text), logits(as_was[task], tokenizer, text), atol=1e-5, rtol=1e-5)
    # Training gates over every rank: the same model in train mode answers as a store without routing.
    with full.unrouted():
        everything = logits(full, tokenizer, topic)
    assert not torch.allclose(everything, logits(as_was[0], tokenizer, topic), atol=1e-3)
    full.train()
    torch.testing.assert_close(logits(full, tokenizer, topic), everything, atol=1e-6, rtol=1e-6)


def test_the_router_reads_the_first_blocks_only_and_stops_there(routed, monkeypatch):
    from moram_cli.tuner import routing

    monkeypatch.setattr(routing, "ROUTING_BLOCKS", 1)
    store, _ = routed
    model, tokenizer = build_memory_model(MemoryStore.open(store))
    layers = model.moram_layers()
    assert [name for name, layer in layers.items() if layer.prototypes is not None] == [n for n in layers if ".layers.0." in n]
    calls = []
    hooks = [layer.base_layer.register_forward_hook(lambda *_, name=name: calls.append(name)) for name, layer in layers.items()]
    logits(model, tokenizer, COUNTING[3]["prompt"])
    for hook in hooks:
        hook.remove()
    # the first pass ran block 0 alone; the answer ran every block once
    assert [n for n in calls if ".layers.1." in n] == [n for n in layers if ".layers.1." in n]
    assert len([n for n in calls if ".layers.0." in n]) == 2 * len([n for n in layers if ".layers.0." in n])


def test_a_bank_records_the_prototypes_of_the_blocks_the_router_reads(new_store, tiny_task, write_jsonl, tmp_path, monkeypatch):
    from moram_cli.tuner import routing

    monkeypatch.setattr(routing, "ROUTING_BLOCKS", 1)
    store = new_store("first-block")
    learn_both(store, tiny_task, write_jsonl(tmp_path / "counting.jsonl", COUNTING))
    opened = MemoryStore.open(store)
    prototypes = [bank.prototypes() for bank in opened.banks()]
    assert [sorted(p) for p in prototypes] == [[f"model.layers.0.self_attn.{m}" for m in ("k_proj", "q_proj")]] * 2
    full, tokenizer = build_memory_model(opened)
    for text, task in ((COUNTING[3]["prompt"], 1), (tiny_task.test.read_text().split('"prompt": "')[1].split('"')[0], 0)):
        assert nearest_task(full, tokenizer, text, prototypes) == task
        torch.testing.assert_close(logits(full, tokenizer, text), logits(build_memory_model(opened, upto=task + 1)[0], tokenizer, text))


def test_the_recorded_matrix_is_the_routed_one(routed, tiny_task):
    store, counting = routed
    report = continual_report(store)
    R = report["matrix"]
    # The topic task routed to its own bank scores after counting exactly as right after it was learned.
    assert R[1][0] == R[0][0] and report["bwt"]["value"] == 0.0
    again = moram_json("eval", store, "--data", tiny_task.test)
    assert again["accuracy"] == R[1][0]


def test_routing_settings_are_checked_and_old_stores_gate_every_token(tmp_path, tiny_model_dir, new_store):
    for flags, message in ((dict(routing="source"), "invalid --routing 'source'; use one of token, task"),
                           (dict(routing="task", method="inclora"), "--routing task needs method moram")):
        with pytest.raises(MoramError, match=message):
            init_store(tmp_path / "bad", base_model=str(tiny_model_dir), **flags)
    assert init_store(tmp_path / "lora", base_model=str(tiny_model_dir), method="lora")["adapter"]["routing"] == "token"
    old = new_store("old")
    config = yaml.safe_load((old / "store.yaml").read_text())
    del config["adapter"]["routing"]
    (old / "store.yaml").write_text(yaml.safe_dump(config))
    assert MemoryStore.open(old).config.adapter.routing == "token"


def test_a_bank_without_prototypes_in_a_task_routed_store_is_named_by_load_and_verify(new_store):
    store = new_store("s")
    for name, seed in (("one", 0), ("two", 1)):
        MemoryStore.open(store).add_bank(name, random_bank(4, seed), {})
    with pytest.raises(MoramError, match="001-one: the bank lacks the task prototypes a task-routed store needs"):
        build_memory_model(MemoryStore.open(store))
    problems = verify_store(store)["problems"]
    assert len(problems) == 2 and all("lacks the task prototypes" in problem for problem in problems)


def test_gate_scope_task_learns_each_task_alone_and_answers_with_its_bank_alone(tmp_path, tiny_model_dir, tiny_task, write_jsonl):
    init = dict(base_model=str(tiny_model_dir), r=4, k=2, gate_scope="task")
    adapter = init_store(tmp_path / "own", **init)["adapter"]
    assert (adapter["routing"], adapter["key_init"]) == ("task", "kaiming")
    counting = write_jsonl(tmp_path / "counting.jsonl", COUNTING)
    learn_both(tmp_path / "own", tiny_task, counting)
    opened = MemoryStore.open(tmp_path / "own")
    full, tokenizer = build_memory_model(opened)
    # Counting's inputs are answered by its bank alone, as a store holding only that bank answers them.
    init_store(tmp_path / "alone", **init)
    MemoryStore.open(tmp_path / "alone").add_bank("counting", opened.banks()[1].tensors(), {})
    alone, _ = build_memory_model(MemoryStore.open(tmp_path / "alone"))
    text = COUNTING[3]["prompt"]
    torch.testing.assert_close(logits(full, tokenizer, text), logits(alone, tokenizer, text), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits(full, tokenizer, text), logits(build_memory_model(opened, upto=1)[0], tokenizer, text), atol=1e-3)
    # A new task trains on the bare model plus its own ranks: the frozen banks change nothing in training.
    init_store(tmp_path / "empty", **init)
    fresh, _ = build_memory_model(MemoryStore.open(tmp_path / "empty"))
    for model in (full, fresh):
        model.add_task_ranks(4, seed=3)
        for layer in model.moram_layers().values():
            layer.moram_B["default"].data = torch.randn(layer.moram_B["default"].shape, generator=torch.Generator().manual_seed(5))
        model.train()
    torch.testing.assert_close(logits(full, tokenizer, text), logits(fresh, tokenizer, text), atol=1e-6, rtol=1e-6)


def test_gate_scope_task_needs_task_routing(tmp_path, tiny_model_dir):
    with pytest.raises(MoramError, match="--gate-scope task answers each input as its own task learned to, which needs --routing task"):
        init_store(tmp_path / "bad", base_model=str(tiny_model_dir), gate_scope="task", routing="token")
    assert not (tmp_path / "bad").exists()
