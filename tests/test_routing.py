"""Source routing of merged stores: groups recorded by `merge`, each input answered exactly as one source would."""

from __future__ import annotations

import shutil

import pytest
import torch
import yaml

from conftest import random_bank, snapshot
from moram_cli.models.memory import build_memory_model
from moram_cli.store import MemoryStore
from test_errors import fails_cleanly
from test_merge import make_store, meta, moram_json  # noqa: F401  (make_store is a fixture)


def groups(store) -> list:
    return [meta(store, bank.path.name).get("routing_groups") for bank in MemoryStore.open(store).banks()]


def test_merge_records_one_group_per_source_and_keeps_inner_groups(make_store, tmp_path):
    a, b, c = make_store("a", {"one": 1, "two": 2}), make_store("b", {"three": 3}), make_store("c", {"four": 4})
    result = moram_json("merge", tmp_path / "ab", a, b)
    assert result["routing"] == "source" and [x["routing_groups"] for x in result["banks"]] == [[0], [0], [1]]
    assert groups(tmp_path / "ab") == [[0], [0], [1]]
    # A source-routed source keeps its groups; the next source becomes a new one.
    moram_json("merge", tmp_path / "abc", tmp_path / "ab", c)
    assert groups(tmp_path / "abc") == [[0], [0], [1], [2]]
    # With token routing the merged store is one memory: no groups recorded, stale ones dropped.
    assert moram_json("merge", tmp_path / "flat", tmp_path / "ab", "--routing", "token")["routing"] == "token"
    assert groups(tmp_path / "flat") == [None, None, None]
    moram_json("merge", tmp_path / "flat-c", tmp_path / "flat", c)
    assert groups(tmp_path / "flat-c") == [[0], [0], [0], [1]]


def test_a_bank_two_sources_share_is_stored_once_in_both_groups(make_store, tmp_path):
    a = make_store("a", {"one": 1})
    shutil.copytree(a, tmp_path / "a2")
    MemoryStore.open(tmp_path / "a2").add_bank("two", random_bank(4, 2), {})
    result = moram_json("merge", tmp_path / "out", a, tmp_path / "a2")
    assert result["deduplicated"] == 1 and groups(tmp_path / "out") == [[0, 1], [1]]
    merged, _ = build_memory_model(MemoryStore.open(tmp_path / "out"))
    sources = [build_memory_model(MemoryStore.open(s))[0] for s in (a, tmp_path / "a2")]
    torch.manual_seed(0)
    for length in range(3, 13):
        ids = torch.randint(3, 40, (1, length))
        torch.testing.assert_close(_logits(merged, ids), _logits(sources[_choice(merged, ids)], ids), atol=1e-5, rtol=1e-5)


def _logits(model, ids, mask=None):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits


def _merged_and_sources(make_store, tmp_path):
    a, b = make_store("a", {"one": 1}), make_store("b", {"two": 7})
    moram_json("merge", tmp_path / "out", a, b)
    merged, _ = build_memory_model(MemoryStore.open(tmp_path / "out"))
    router = next(iter(merged.moram_layers().values())).router
    return merged, router, [build_memory_model(MemoryStore.open(s))[0] for s in (a, b)]


def test_each_input_is_answered_exactly_as_by_the_source_its_experts_pick(make_store, tmp_path):
    merged, router, sources = _merged_and_sources(make_store, tmp_path)
    torch.manual_seed(0)
    picked = {}
    for length in range(3, 23):
        ids = torch.randint(3, 40, (1, length))
        logits = _logits(merged, ids)
        choice = int(router.chosen)
        picked.setdefault(choice, ids)
        torch.testing.assert_close(logits, _logits(sources[choice], ids), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(logits, _logits(sources[1 - choice], ids), atol=1e-4)
    assert set(picked) == {0, 1}, "the test inputs should reach both sources"
    # In a right-padded batch each sequence still chooses as alone: padded positions are left out of the scores.
    # The padding here repeats the other sequence, so had its positions been scored they would flip both choices.
    first, second = picked[0][0], picked[1][0]
    width = 60
    ids = torch.stack([torch.cat([seq, other.repeat(width)])[:width] for seq, other in ((first, second), (second, first))])
    mask = torch.zeros_like(ids)
    mask[0, :len(first)], mask[1, :len(second)] = 1, 1
    _logits(merged, ids, mask)
    assert router.chosen.tolist() == [0, 1]


# Callers still on transformers' deprecated name (until 5.40) pass the cache as past_key_values.
@pytest.mark.parametrize("cache_kwarg", ["cache", pytest.param("past_key_values", marks=pytest.mark.filterwarnings("ignore::FutureWarning"))])
def test_a_cached_continuation_keeps_its_prompts_choice(make_store, tmp_path, cache_kwarg):
    merged, router, sources = _merged_and_sources(make_store, tmp_path)
    torch.manual_seed(3)
    prompt, rest = torch.randint(3, 40, (1, 9)), torch.randint(3, 40, (3, 4))
    with torch.no_grad():
        cache = merged(input_ids=prompt, use_cache=True).cache
        choice = int(router.chosen)
        cache.batch_repeat_interleave(3)
        continued = merged(input_ids=rest, **{cache_kwarg: cache}).logits
    assert router.chosen.tolist() == [choice] * 3
    whole = _logits(sources[choice], torch.cat([prompt.expand(3, -1), rest], dim=1))[:, -4:]
    torch.testing.assert_close(continued, whole, atol=1e-5, rtol=1e-5)


def test_a_source_routed_store_refuses_new_tasks_and_bad_groups(make_store, tmp_path, tiny_task):
    a, b = make_store("a", {"one": 1}), make_store("b", {"two": 7})
    out = tmp_path / "out"
    moram_json("merge", out, a, b)
    fails_cleanly(["learn-task", out, "--data", tiny_task.train], out, "learn the task in a source store and merge again")
    path = out / "banks" / "002-two" / "bank.yaml"
    data = yaml.safe_load(path.read_text())
    data["routing_groups"] = "1"
    path.write_text(yaml.safe_dump(data))
    for command in (["eval", out, "--data", tiny_task.test], ["verify", out]):
        fails_cleanly(command, out, "002-two: bank.yaml lacks the routing_groups")


def test_routing_source_needs_the_moram_gate(make_store, tmp_path):
    inc = make_store("inc", {"one": 1}, "--method", "inclora")
    assert moram_json("merge", tmp_path / "default", inc)["routing"] == "token"
    fails_cleanly(["merge", tmp_path / "out", inc, "--routing", "source"], inc, "the inclora method has no gate")
    fails_cleanly(["merge", tmp_path / "out", inc, "--routing", "bank"], inc, "--routing 'bank' is unknown")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("routing", ["source", "token"])
def test_a_merged_store_evaluates_and_leaves_its_sources_alone(make_store, tmp_path, tiny_task, routing):
    a, b = make_store("a", {"one": 1}), make_store("b", {"two": 7})
    before = snapshot(a), snapshot(b)
    moram_json("merge", tmp_path / "out", a, b, "--routing", routing)
    assert moram_json("eval", tmp_path / "out", "--data", tiny_task.test)["total"] == 12
    assert moram_json("inspect-ranks", tmp_path / "out", "--data", tiny_task.test)["gates"]["tokens"] > 0
    assert (snapshot(a), snapshot(b)) == before


def test_a_recipe_cannot_make_a_new_store_source_routed(tmp_path, tiny_model_dir):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("adapter: {routing: source}\n")
    fails_cleanly(["init", tmp_path / "s", "--base-model", tiny_model_dir, "--recipe", recipe], None, "source routing is for stores moram merge writes")
    assert not (tmp_path / "s").exists()


def test_lm_eval_gets_one_input_at_a_time_from_a_source_routed_store(make_store, tmp_path, monkeypatch):
    """The harness pads a batch without an attention mask, so padding would count when a source is picked."""
    huggingface = pytest.importorskip("lm_eval.models.huggingface")
    from moram_cli.evaluation.harness import evaluate_suite
    from test_harness import TINY_TOPIC

    class Built(Exception):
        pass

    sizes = []

    def record(**kwargs):
        sizes.append(kwargs["batch_size"])
        raise Built

    monkeypatch.setattr(huggingface, "HFLM", record)
    a, b = make_store("a", {"one": 1}), make_store("b", {"two": 7})
    for routing in ("source", "token"):
        moram_json("merge", tmp_path / routing, a, b, "--routing", routing)
        with pytest.raises(Built):
            evaluate_suite(tmp_path / routing, suite_path=TINY_TOPIC, batch_size=8)
    assert sizes == [1, 8]


def test_a_source_with_more_banks_is_not_outvoted_for_its_size(make_store, tmp_path):
    """A normalised maximum falls as ranks are added, so sources are scored by their best bank, never as one pool."""
    small = make_store("small", {"one": 1})
    big = make_store("big", {"one": 1, "extra": 5})
    other = make_store("other", {"two": 7})
    moram_json("merge", tmp_path / "small-other", small, other)
    moram_json("merge", tmp_path / "big-other", big, other)
    models = [build_memory_model(MemoryStore.open(tmp_path / name))[0] for name in ("small-other", "big-other")]
    torch.manual_seed(1)
    choices = [[_choice(model, ids) for model in models] for ids in (torch.randint(3, 40, (1, n)) for n in range(3, 33))]
    assert any(alone == 0 for alone, _ in choices), "some inputs should pick the first source"
    # Wherever bank "one" alone wins an input, the source holding it and one more bank wins it too.
    assert all(with_extra == 0 for alone, with_extra in choices if alone == 0)


def _choice(model, ids) -> int:
    _logits(model, ids)
    return int(next(iter(model.moram_layers().values())).router.chosen)
