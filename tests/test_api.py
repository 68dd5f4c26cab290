"""A learned store used by an application: `moram_cli.load` and `moram generate`, on the tiny Llama."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from typer.testing import CliRunner

import moram_cli
from moram_cli.cli import app
from moram_cli.errors import MoramError
from moram_cli.evaluation.scoring import generate_batch
from moram_cli.models.memory import build_memory_model
from moram_cli.store import MemoryStore
from moram_cli.training.learn import learn_task
from test_merge import make_store, moram_json  # noqa: F401  (make_store is a fixture)

# The README's example ("Using a store from Python"), read from the README itself: the test runs it in a folder holding store/.
README = Path(__file__).resolve().parents[1] / "README.md"
README_EXAMPLE = README.read_text().split("### Using a store from Python", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]

runner = CliRunner()


@pytest.fixture
def learned(new_store, tiny_task):
    """A store with one bank (two training steps on the tiny task), at tmp_path/store."""
    store = new_store("store")
    learn_task(store, tiny_task.train, show_progress=False, max_steps=2, batch_size=4)
    return store


@pytest.fixture
def prompts(tiny_task) -> list[str]:
    return [json.loads(line)["prompt"] for line in tiny_task.test.read_text().splitlines()]


# Prompts of different lengths, which the tiny Llama continues differently.
VARIED = ["river", "the market price of a big bank", "Hello, how are", "Continual learning adds new",
          "The quick brown fox jumps over the lazy", "a team goal after the match today near the old lake", "What is the"]


@pytest.fixture
def varied(tmp_path, write_jsonl):
    return write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": text, "completion": "-"} for text in VARIED])


def batched_as_alone(store, data) -> dict:
    """`generate --data` in batches of 3, checked to give what one prompt at a time gives: left padding must change no answer."""
    batched = moram_json("generate", store, "--data", data, "--batch-size", "3", "--max-new-tokens", "6")
    assert batched == moram_json("generate", store, "--data", data, "--batch-size", "1", "--max-new-tokens", "6")
    # Greedy text hides small changes (the tiny Llama mostly repeats itself); the first step's scores show them.
    memory, tokenizer = build_memory_model(MemoryStore.open(store))
    alone = torch.cat([first_step_scores(memory, tokenizer, [text]) for text in VARIED])
    torch.testing.assert_close(first_step_scores(memory, tokenizer, VARIED), alone, atol=1e-5, rtol=1e-5)
    return batched


def first_step_scores(memory, tokenizer, prompts: list[str]) -> torch.Tensor:
    """The logits `generate_batch` picks its first tokens from, one row per prompt."""
    scores = []

    def keeping_scores(**kwargs):
        output = memory.model.generate(**kwargs, output_scores=True, return_dict_in_generate=True)
        scores.append(output.scores[0])
        return output.sequences

    memory.generate = keeping_scores
    generate_batch(memory, tokenizer, prompts, 1, 512)
    return scores[0]


def test_importing_the_package_loads_neither_torch_nor_transformers_until_load_is_used():
    # `moram --help` imports the package, so its startup must not pay for them.
    code = ("import sys, moram_cli; heavy = lambda: sorted({'torch', 'transformers'} & set(sys.modules)); "
            "before = heavy(); moram_cli.load; print(before, heavy())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[] ['torch', 'transformers']"


def test_the_readme_example_runs_and_prints_what_moram_generate_prints(learned, monkeypatch, capsys):
    monkeypatch.chdir(learned.parent)
    namespace = {}
    exec(README_EXAMPLE, namespace)
    completion = moram_json("generate", learned, "--prompt", namespace["prompt"], "--max-new-tokens", "8")["completions"][0]["completion"]
    assert capsys.readouterr().out == completion + "\n"


def test_load_gives_the_model_eval_scores_frozen_and_in_inference_mode(learned, prompts):
    model, tokenizer = moram_cli.load(learned)
    memory, _ = build_memory_model(MemoryStore.open(learned))
    inputs = tokenizer(prompts[:2], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, memory(**inputs).logits)
        assert not torch.equal(model(**inputs).logits, moram_cli.load(learned, upto=0)[0](**inputs).logits)
    assert isinstance(model, PreTrainedModel) and not any(module.training for module in model.modules())
    assert not any(p.requires_grad for p in model.parameters())


def test_load_refuses_a_missing_store_and_a_bad_upto_in_one_line(learned, tmp_path):
    for store, upto, expect in [(tmp_path / "nowhere", None, "not a moram store"), (learned, 2, "out of range"), (learned, -1, "out of range")]:
        with pytest.raises(MoramError, match=expect) as err:
            moram_cli.load(store, upto=upto)
        assert "\n" not in str(err.value)


def test_generate_a_prompt_greedily_and_the_same_every_time(learned, prompts):
    first = moram_json("generate", learned, "--prompt", prompts[0], "--max-new-tokens", "6")
    assert first["banks"] == ["001-tiny_task0"] and first["max_new_tokens"] == 6 and first["truncated_prompts"] == 0
    assert [set(record) for record in first["completions"]] == [{"prompt", "completion"}]
    assert first["completions"][0]["prompt"] == prompts[0] and first["completions"][0]["completion"]
    assert moram_json("generate", learned, "--prompt", prompts[0], "--max-new-tokens", "6") == first


def test_generate_over_a_data_file_in_batches_gives_what_one_prompt_at_a_time_gives(learned, varied):
    result = batched_as_alone(learned, varied)
    assert result["data"] == str(varied) and [record["prompt"] for record in result["completions"]] == VARIED
    assert len({record["completion"] for record in result["completions"]}) == len(VARIED)


def test_batches_keep_each_prompts_own_source_in_a_merged_store(make_store, tmp_path, varied):
    # Source routing picks a source per sequence on its first pass; the pads of a batch must not sway it.
    moram_json("merge", tmp_path / "merged", make_store("a", {"one": 1}), make_store("b", {"two": 7}))
    batched_as_alone(tmp_path / "merged", varied)


def test_generate_continues_chat_lines_after_the_chat_template(learned, tmp_path, write_jsonl):
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "river lake?"}, {"role": "assistant", "content": "alpha"}]}])
    (record,) = moram_json("generate", learned, "--data", chat, "--max-new-tokens", "3")["completions"]
    assert record["prompt"] == "<|im_start|>user\nriver lake?<|im_end|>\n<|im_start|>assistant\n"


def test_generate_upto_zero_is_the_bare_base_model(learned, tiny_model_dir):
    result = moram_json("generate", learned, "--prompt", "the market price of a big bank", "--upto", "0", "--max-new-tokens", "8")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    [(expected, _)] = generate_batch(base, AutoTokenizer.from_pretrained(tiny_model_dir), ["the market price of a big bank"], 8, 512)
    assert result["banks"] == [] and result["completions"][0]["completion"] == expected != ""


def test_generate_prints_a_table_without_json(learned):
    result = runner.invoke(app, ["generate", str(learned), "--prompt", "river", "--max-new-tokens", "2"])
    assert result.exit_code == 0 and "completion" in result.stdout and "001-tiny_task0" in result.stdout, result.output


@pytest.mark.parametrize("args, expect", [([], "exactly one of"), (["--prompt", "river", "--data", "x.jsonl"], "exactly one of"),
                                          (["--prompt", "river", "--max-new-tokens", "0"], "at least 1"),
                                          (["--prompt", "river", "--max-new-tokens", "600"], "no room for the prompt")])
def test_generate_usage_errors_are_one_line_with_exit_2(learned, args, expect):
    result = runner.invoke(app, ["generate", str(learned), *args])
    assert result.exit_code == 2 and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.output
    assert expect in result.stderr


def test_generate_help_names_every_flag():
    text = runner.invoke(app, ["generate", "--help"]).output
    assert all(flag in text for flag in ["--prompt", "--data", "--max-new-tokens", "[default: 64]", "--upto", "--max-length", "--batch-size",
                                         "--trust-remote-code", "--json", "greedy"])
