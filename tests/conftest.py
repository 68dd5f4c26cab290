"""Shared fixtures: a tiny tokenizer and model built in-process, and tiny data sets.

Nothing is downloaded: the tokenizer is a byte-level BPE trained on a few
sentences and the model is a randomly initialised two-layer Llama, so the
whole session builds in about a second.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

EOS, PAD, IM_START = "<|im_end|>", "<|endoftext|>", "<|im_start|>"

# ChatML, as in SmolLM2-Instruct but without its default system prompt.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

LABELS = ("alpha", "beta", "gamma")
TASK_QUESTION = "What is the topic of the following paragraph? Choose one from the option."

# Words that give each label away, so a model can actually learn the tiny task.
_CUES = {
    "alpha": ("river", "mountain", "forest", "lake"),
    "beta": ("market", "price", "bank", "trade"),
    "gamma": ("match", "team", "goal", "player"),
}
_FILLER = ("the", "a", "near", "with", "after", "today", "new", "old", "big", "small")

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Language models learn to predict the next word from the words before it.",
    "Continual learning adds new tasks without forgetting the old ones.",
    "What is the sentiment of the following review? Answer positive or negative.",
    "Question: Which option is correct? Answer: the first one.",
    "Hello, how are you today? I am fine, thank you.",
    "system user assistant You are a helpful assistant.",
    TASK_QUESTION,
    "Option: World, Sports, Business, Science \nTitle: \nText: \n\nAnswer:",
    "Option: " + ", ".join(LABELS) + " ",
    " ".join(LABELS + tuple(w for cues in _CUES.values() for w in cues) + _FILLER),
]


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE (vocab ~360) with ChatML special tokens and chat template."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=360,
        special_tokens=[PAD, IM_START, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=IM_START,
        eos_token=EOS,
        pad_token=PAD,
        chat_template=CHATML_TEMPLATE,
    )


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny_tokenizer")
    build_tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny_model")
    tokenizer = build_tiny_tokenizer()
    tokenizer.save_pretrained(path)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def _dump_jsonl(path: Path, rows: list[dict | str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def write_jsonl() -> Callable[[Path, list[dict | str]], Path]:
    """`write_jsonl(path, rows)`: dict rows are JSON-encoded, str rows written verbatim."""
    return _dump_jsonl


@dataclass(frozen=True)
class TinyTask:
    train: Path
    test: Path
    labels: tuple[str, ...] = LABELS


def tiny_task_rows(count: int, seed: int) -> list[dict]:
    """Prompt/completion rows in the O-LoRA topic format; labels cycle so each is equally common."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        label = LABELS[i % len(LABELS)]
        cue, other = rng.sample(_CUES[label], 2)
        title = f"{rng.choice(_FILLER)} {cue}"
        text = f"{rng.choice(_FILLER)} {other} {rng.choice(_FILLER)} {cue}"
        prompt = (
            f"{TASK_QUESTION}\nOption: {', '.join(LABELS)} \nTitle: {title}\nText: {text}\n\nAnswer:"
        )
        rows.append({"prompt": prompt, "completion": label})
    return rows


@pytest.fixture(scope="session")
def tiny_task(tmp_path_factory: pytest.TempPathFactory) -> TinyTask:
    """24 train / 12 test lines of a three-label topic task (labels alpha, beta, gamma)."""
    root = tmp_path_factory.mktemp("tiny_task")
    return TinyTask(
        train=_dump_jsonl(root / "train.jsonl", tiny_task_rows(24, seed=1)),
        test=_dump_jsonl(root / "test.jsonl", tiny_task_rows(12, seed=2)),
    )


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Keep fingerprints and converted models out of the user's ~/.cache (unless a test run sets MORAM_CACHE)."""
    import os

    path = Path(os.environ.get("MORAM_CACHE") or tmp_path_factory.mktemp("moram_cache"))
    os.environ["MORAM_CACHE"] = str(path)
    return path


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` with its bytes: two equal snapshots mean nothing changed."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


# In and out features of the adapted modules of the tiny Llama (two key-value heads of size 8).
TINY_SHAPES = {"q_proj": (32, 32), "k_proj": (32, 16)}


def random_bank(r: int, seed: int, values: bool = True) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A bank for the tiny Llama without training: random keys, random values (or zero ones, as before training)."""
    g = torch.Generator().manual_seed(seed)
    return {
        f"model.layers.{i}.self_attn.{m}": (torch.randn(r, d_in, generator=g) / d_in**0.5,
                                            torch.randn(d_out, r, generator=g) * (0.1 if values else 0.0))
        for i in range(2) for m, (d_in, d_out) in TINY_SHAPES.items()
    }


@pytest.fixture
def new_store(tmp_path: Path, tiny_model_dir: Path) -> Callable[[str], Path]:
    """`new_store(name)`: an empty store `tmp_path/name` on the tiny Llama, 4 new ranks per task, k=2."""
    from moram_cli.store.init import init_store

    def make(name: str) -> Path:
        init_store(tmp_path / name, base_model=str(tiny_model_dir), r=4, k=2)
        return tmp_path / name

    return make


@pytest.fixture
def tasks_dir(tmp_path, write_jsonl):
    """Three tasks in the benchmark pack's layout: <task>/train.jsonl, test.jsonl, labels.json."""
    for i, task in enumerate(("one", "two", "three")):
        write_jsonl(tmp_path / "tasks" / task / "train.jsonl", tiny_task_rows(16, seed=30 + i))
        write_jsonl(tmp_path / "tasks" / task / "test.jsonl", tiny_task_rows(6, seed=40 + i))
        (tmp_path / "tasks" / task / "labels.json").write_text(json.dumps(list(LABELS)))
    return tmp_path / "tasks"
