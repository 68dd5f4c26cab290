"""Gate scope `weighted`: each task learns a gain per earlier bank, by which its answers weigh that bank's output.

The independent check throughout: a bank's output is linear in its values and
its gate does not read them, so weighing bank b by w equals gate scope `bank`
with bank b's values multiplied by w.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import random_bank
from moram_cli.errors import MoramError
from moram_cli.models.memory import build_memory_model
from moram_cli.store import MemoryStore
from moram_cli.store.bank import GAINS, PROTOTYPE
from moram_cli.store.init import init_store
from moram_cli.store.merge import plan_merge
from moram_cli.store.verify import verify_store
from moram_cli.tuner import MoramConfig, MoramLayer
from moram_cli.tuner.routing import TaskRouter
from test_task_routing import COUNTING, learn_both, logits

SIZES = [4, 4, 4]


def layers(generator: torch.Generator) -> tuple[MoramLayer, MoramLayer, torch.Tensor, torch.Tensor]:
    """A weighted and a bank-scoped layer over one float64 linear, and three frozen banks' keys and values."""
    base = nn.Linear(16, 12, bias=False).double().requires_grad_(False)
    made = [MoramLayer(base, "default", MoramConfig(r=4, k=2, gate_scope=scope)).double() for scope in ("weighted", "bank")]
    A = torch.randn(sum(SIZES), 16, generator=generator, dtype=torch.float64)
    B = torch.randn(12, sum(SIZES), generator=generator, dtype=torch.float64)
    return made[0], made[1], A, B


def install(layer: MoramLayer, A: torch.Tensor, B: torch.Tensor, gains: torch.Tensor | None = None) -> None:
    """Frozen banks, held in float64 (set_frozen stores them in float32)."""
    layer.set_frozen(A, B, SIZES, gains)
    layer.double()


def scaled(B: torch.Tensor, gains: torch.Tensor) -> torch.Tensor:
    """Values with each bank's columns times its gain."""
    return B * torch.cat([g.expand(size) for g, size in zip(gains, SIZES)]).to(B.dtype)


def test_weighing_a_bank_equals_scaling_its_values_in_every_pass():
    generator = torch.Generator().manual_seed(0)
    weighted, bank, A, B = layers(generator)
    # Powers of two: set_frozen rounds to float32, where scaling by them is exact.
    table = torch.tensor([[1.0, 0, 0], [0.25, 1, 0], [-0.5, 2.0, 1]], dtype=torch.float64)
    install(weighted, A, B, table)
    x = torch.randn(2, 5, 16, generator=generator, dtype=torch.float64)
    for layer in (weighted, bank):
        layer.eval()
    # Unrouted: the newest bank's row.
    install(bank, A, scaled(B, table[-1]))
    torch.testing.assert_close(weighted(x), bank(x), rtol=0, atol=1e-12)
    # Routed: each sequence its task's row, and the banks after that task are left out.
    for layer in (weighted, bank):
        layer.router = TaskRouter(banks=3)
        layer.router.chosen = torch.tensor([0, 1])
        layer.group_member = torch.tensor([[True] * 4 + [False] * 8, [True] * 8 + [False] * 4, [True] * 12])
    rows = []
    for task in (0, 1):
        install(bank, A, scaled(B, table[task]))
        rows.append(bank(x)[task])
    torch.testing.assert_close(weighted(x), torch.stack(rows), rtol=0, atol=1e-12)


def test_a_new_bank_trains_its_gains_with_the_gradient_of_scaled_values():
    generator = torch.Generator().manual_seed(1)
    weighted, bank, A, B = layers(generator)
    install(weighted, A, B)
    install(bank, A, B)
    for layer in (weighted, bank):
        layer.add_ranks(4, torch.Generator().manual_seed(2))
        layer.double()
        layer.moram_B["default"].data = torch.randn(12, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        layer.train()
    gains = weighted.moram_gain["default"]
    assert torch.equal(gains.detach(), torch.ones(3, dtype=torch.float64))
    x = torch.randn(2, 5, 16, generator=generator, dtype=torch.float64)
    # At its start (every gain 1) the layer is gate scope bank, exactly.
    torch.testing.assert_close(weighted(x), bank(x), rtol=0, atol=0)
    gains.data = torch.tensor([0.5, 0.0, 2.0], dtype=torch.float64)
    weighted(x).square().sum().backward()
    # The output is linear in each gain: d loss / d w_b = <d loss / d out, bank b's output at gain 1>, each bank's output
    # taken from the bank-scoped layer as the change that one more unit of its gain makes.
    install(bank, A, scaled(B, gains.detach()))
    out = bank(x)
    contributions = []
    for b in range(3):
        install(bank, A, scaled(B, gains.detach() + torch.eye(3, dtype=torch.float64)[b]))
        contributions.append(bank(x) - out)
    expected = torch.stack([(2 * out * c).sum() for c in contributions])
    # float32 values times 3 round (set_frozen stores float32): agreement to 1e-8 relative.
    torch.testing.assert_close(gains.grad, expected.detach(), rtol=1e-7, atol=0)


def weighted_store(tmp_path, tiny_model_dir, name: str, **settings):
    init_store(tmp_path / name, base_model=str(tiny_model_dir), r=4, k=2, gate_scope="weighted", **settings)
    return tmp_path / name


def test_learn_task_records_trained_gains_and_answers_with_the_routed_tasks_row(tmp_path, tiny_model_dir, tiny_task, write_jsonl):
    store = weighted_store(tmp_path, tiny_model_dir, "w", gain_lr=0.1)
    counting = write_jsonl(tmp_path / "counting.jsonl", COUNTING)
    learn_both(store, tiny_task, counting)
    opened = MemoryStore.open(store)
    first, second = (bank.extras() for bank in opened.banks())
    assert GAINS not in first and set(second[GAINS]) == set(second[PROTOTYPE])
    moved = torch.stack(list(second[GAINS].values()))
    assert moved.shape[1] == 1 and (moved - 1).abs().max() > 0.05
    assert opened.banks()[1].metadata()["earlier_bank_gains"] == {"001-topic": round(float(moved.mean()), 4)}
    assert verify_store(store)["ok"]
    # The same banks in a bank-scoped store, the first bank's values times the second's gains, answer counting alike;
    # the topic task is still answered by the first bank alone, as before counting was learned.
    init_store(tmp_path / "b", base_model=str(tiny_model_dir), r=4, k=2, gate_scope="bank")
    reference = MemoryStore.open(tmp_path / "b")
    one, two = (bank.tensors() for bank in opened.banks())
    reference.add_bank("topic", {m: (A, B * second[GAINS][m]) for m, (A, B) in one.items()}, {}, {PROTOTYPE: first[PROTOTYPE]})
    reference.add_bank("counting", two, {}, {PROTOTYPE: second[PROTOTYPE]})
    full, tokenizer = build_memory_model(opened)
    text = COUNTING[3]["prompt"]
    torch.testing.assert_close(logits(full, tokenizer, text), logits(build_memory_model(reference)[0], tokenizer, text), atol=1e-5, rtol=1e-5)
    topic = tiny_task.train.read_text().splitlines()[0].split('"prompt": "')[1].split('", "completion"')[0]
    torch.testing.assert_close(logits(full, tokenizer, topic), logits(build_memory_model(opened, upto=1)[0], tokenizer, topic),
                               atol=1e-5, rtol=1e-5)


def test_gains_train_at_gain_lr(tmp_path, tiny_model_dir, tiny_task, write_jsonl):
    store = weighted_store(tmp_path, tiny_model_dir, "slow", gain_lr=1e-7)
    learn_both(store, tiny_task, write_jsonl(tmp_path / "counting.jsonl", COUNTING))
    gains = MemoryStore.open(store).banks()[1].extras()[GAINS]
    assert all((g - 1).abs().max() < 1e-5 for g in gains.values())


def test_weighted_needs_task_routing_and_complete_banks_and_is_not_merged(tmp_path, tiny_model_dir):
    with pytest.raises(MoramError, match="--gate-scope weighted answers each input as its own task learned to, which needs --routing task"):
        weighted_store(tmp_path, tiny_model_dir, "token", routing="token")
    assert not (tmp_path / "token").exists()
    store = weighted_store(tmp_path, tiny_model_dir, "w")
    for name, seed in (("one", 0), ("two", 1)):
        bank = random_bank(4, seed)
        MemoryStore.open(store).add_bank(name, bank, {}, {PROTOTYPE: {m: torch.zeros(A.shape[1]) for m, (A, _) in bank.items()}})
    with pytest.raises(MoramError, match="002-two: the bank lacks the earlier-bank gains a store with gate scope weighted needs"):
        build_memory_model(MemoryStore.open(store))
    assert [p.split(": ", 1)[1] for p in verify_store(store)["problems"]] == [
        "the bank lacks the earlier-bank gains a store with gate scope weighted needs; the bank is corrupt, restore it from a backup"]
    with pytest.raises(MoramError, match="gate scope weighted.*merge stores of another gate scope"):
        plan_merge([store, store], None, None)
