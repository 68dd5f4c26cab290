"""Tests of moram_cli.data: reading JSONL, tokenising, batching."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from moram_cli.data.batching import collate, length_bucketed_batches
from moram_cli.data.encode import (
    IGNORE_INDEX,
    Encoded,
    encode_completion,
    encode_dataset,
    encode_for_training,
    encode_prompt,
    separator,
    split_example,
)
from moram_cli.data.jsonl import Example, read_examples
from moram_cli.errors import MoramError

QUESTION = "What is the topic of the following paragraph? Choose one from the option."
OPTIONS = "Option: World, Sports, Business "


def topic_prompt(text: str) -> str:
    return f"{QUESTION}\n{OPTIONS}\nTitle: a river\nText: {text}\n\nAnswer:"


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def bos_eos_tok(tiny_tokenizer_dir):
    """The tiny tokenizer made to add a BOS and an EOS around every text, like some base models do."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir, add_bos_token=True, add_eos_token=True)
    tokenizer.bos_token = "<|endoftext|>"
    tokenizer.update_post_processor()
    return tokenizer


def assert_user_error(err: pytest.ExceptionInfo, where: str) -> str:
    message = str(err.value)
    assert "\n" not in message and "\r" not in message
    assert message.startswith(f"{where}:" if where else "")
    assert err.value.exit_code == 2
    return message


# ---------------------------------------------------------------- reading


def test_reads_prompt_completion_and_keeps_file_line_numbers(tmp_path, write_jsonl):
    rows = [{"prompt": "a", "completion": "b", "id": 7}, "", "   ", {"prompt": "", "completion": "d"}]
    examples = read_examples(write_jsonl(tmp_path / "d.jsonl", rows))
    assert [(e.line, e.kind, e.prompt, e.completion) for e in examples] == [
        (1, "prompt", "a", "b"),
        (4, "prompt", "", "d"),
    ]


def test_accepts_bom_and_crlf(tmp_path):
    path = tmp_path / "win.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "p1", "completion": "c1"}\r\n\r\n{"prompt": "p2", "completion": "c2"}\r\n')
    examples = read_examples(path)
    assert [(e.line, e.prompt, e.completion) for e in examples] == [(1, "p1", "c1"), (3, "p2", "c2")]


def test_reads_messages_and_text_formats(tmp_path, write_jsonl):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello", "weight": 1}]
    chat = read_examples(write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}]))
    assert chat[0].kind == "messages" and chat[0].messages == tuple(messages)
    plain = read_examples(write_jsonl(tmp_path / "lm.jsonl", [{"text": "some words", "meta": None}]))
    assert plain[0].kind == "text" and plain[0].text == "some words"


HINT = "each line needs"
BAD_LINES = [
    ('{"prompt": "a", ', "invalid JSON"),
    ("[1, 2]", "line is an array, not a JSON object"),
    ("42", "line is a number"),
    ('"just a string"', "line is a string"),
    ("null", "line is null"),
    ('{"prompt": "x"}', "missing field 'completion'; " + HINT),
    ('{"completion": "x"}', "missing field 'prompt'"),
    ('{"prompt": "x", "completion": 3}', "field 'completion' must be a string, got a number"),
    ('{"prompt": null, "completion": "x"}', "field 'prompt' must be a string, got null"),
    ('{"prompt": "x", "completion": ""}', "field 'completion' is empty"),
    ('{"input": "x", "output": "y"}', "no known fields (found 'input', 'output')"),
    ("{}", "no known fields (found none)"),
    ('{"prompt": "x", "completion": "y", "text": "z"}', "mixes the prompt/completion and text formats"),
    ('{"text": 5}', "field 'text' must be a string"),
    ('{"text": ""}', "field 'text' is empty"),
    ('{"messages": "hi"}', "field 'messages' must be a non-empty list"),
    ('{"messages": []}', "field 'messages' must be a non-empty list"),
    ('{"messages": ["hi"]}', "messages[0] must be an object"),
    ('{"messages": [{"content": "hi"}]}', "messages[0] has no 'role'"),
    ('{"messages": [{"role": "assistant", "content": 1}]}', "messages[0].content must be a string"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "last message must have role 'assistant'"),
    ('{"messages": [{"role": "assistant", "content": ""}]}', "messages[0].content is empty"),
    ('{"messages": [{"role": "assistant", "content": "hi"}]}', "at least one message"),
    ('{"prompt": "\\ud800", "completion": "x"}', "unpaired surrogate"),
    ("[" * 100_000, "invalid JSON"),
    ('{"prompt": "x", "completion": "y", "n": ' + "9" * 5000 + "}", "invalid JSON"),
]


@pytest.mark.parametrize(("bad_line", "expected"), BAD_LINES)
def test_bad_line_names_file_and_line(tmp_path, write_jsonl, bad_line, expected):
    path = write_jsonl(tmp_path / "data.jsonl", [{"prompt": "ok", "completion": "fine"}, "", bad_line])
    with pytest.raises(MoramError) as err:
        read_examples(path)
    message = assert_user_error(err, f"{path}:3")
    assert expected in message
    assert len(message) < 400 + len(str(path))


def test_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "caf\xe9", "completion": "b"}\n')
    with pytest.raises(MoramError) as err:
        read_examples(path)
    assert "not valid UTF-8" in assert_user_error(err, f"{path}:2")


def test_huge_line_is_not_echoed(tmp_path, write_jsonl):
    path = write_jsonl(tmp_path / "big.jsonl", ['{"prompt": "' + "x" * 100_000])
    with pytest.raises(MoramError) as err:
        read_examples(path)
    assert len(assert_user_error(err, f"{path}:1")) < 300 + len(str(path))


def test_mixed_formats_name_both_lines(tmp_path, write_jsonl):
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}, {"text": "e"}]
    path = write_jsonl(tmp_path / "mix.jsonl", rows)
    with pytest.raises(MoramError) as err:
        read_examples(path)
    message = assert_user_error(err, f"{path}:3")
    assert "text format but line 1 uses prompt/completion" in message


def test_evaluation_rejects_text_format(tmp_path, write_jsonl):
    path = write_jsonl(tmp_path / "lm.jsonl", [{"text": "words"}])
    with pytest.raises(MoramError) as err:
        read_examples(path, allow_text=False)
    assert "evaluation needs" in assert_user_error(err, f"{path}:1")
    assert read_examples(path)[0].text == "words"


def test_missing_file_directory_and_empty_file(tmp_path):
    with pytest.raises(MoramError) as err:
        read_examples(tmp_path / "nope.jsonl")
    assert "data file not found; check the path given to --data" in assert_user_error(err, f"{tmp_path}/nope.jsonl")
    with pytest.raises(MoramError) as err:
        read_examples(tmp_path)
    assert "is a directory" in assert_user_error(err, str(tmp_path))
    for content in (b"", b"\n  \n\r\n", b"\xef\xbb\xbf"):
        (tmp_path / "empty.jsonl").write_bytes(content)
        with pytest.raises(MoramError) as err:
            read_examples(tmp_path / "empty.jsonl")
        assert "no examples" in assert_user_error(err, f"{tmp_path}/empty.jsonl")


# ---------------------------------------------------------------- encoding


@pytest.mark.parametrize(
    ("prompt", "completion", "sep"),
    [
        ("Answer:", "World", " "),
        ("Answer: ", "World", ""),
        ("Answer:", " World", ""),
        ("Answer:\n", "World", ""),
        ("", "World", ""),
    ],
)
def test_separator_rule(tok, prompt, completion, sep):
    assert separator(prompt, completion) == sep
    example = Example(line=1, prompt=prompt, completion=completion)
    assert split_example(example, tok) == (prompt, sep + completion)


def test_messages_use_the_chat_template(tok):
    messages = ({"role": "user", "content": "Which topic? Answer:"}, {"role": "assistant", "content": "World"})
    prompt, completion = split_example(Example(line=1, messages=messages), tok)
    assert prompt == "<|im_start|>user\nWhich topic? Answer:<|im_end|>\n<|im_start|>assistant\n"
    assert completion == "World"
    encoded = encode_for_training(Example(line=1, messages=messages), tok, max_length=64)
    assert encoded.input_ids == tok(prompt)["input_ids"] + tok("World")["input_ids"] + [tok.eos_token_id]


def test_messages_without_a_usable_chat_template(tiny_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    messages = ({"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"})
    example = Example(line=4, source="chat.jsonl", messages=messages)
    tokenizer.chat_template = "{{ raise_exception('Conversation roles must alternate\\nuser/assistant') }}"
    with pytest.raises(MoramError) as err:
        split_example(example, tokenizer)
    assert "chat template rejected" in assert_user_error(err, "chat.jsonl:4")
    tokenizer.chat_template = None
    with pytest.raises(MoramError) as err:
        split_example(example, tokenizer)
    assert "has none" in assert_user_error(err, "chat.jsonl:4")


def test_labels_mask_the_prompt_exactly(tok):
    prompt = topic_prompt("the team scored a late goal")
    encoded = encode_for_training(Example(line=1, prompt=prompt, completion="Sports"), tok, max_length=256)
    prompt_ids = tok(prompt)["input_ids"]
    completion_ids = tok(" Sports", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert encoded.input_ids == prompt_ids + completion_ids
    assert encoded.labels == [IGNORE_INDEX] * len(prompt_ids) + completion_ids
    assert not encoded.truncated


@pytest.mark.parametrize("text", ["", "one line only", topic_prompt("market prices rose"), "ends with newline\n\n"])
def test_prompts_that_fit_tokenise_as_usual(tok, text):
    assert encode_prompt(text, tok, budget=10_000) == (tok(text)["input_ids"], False)


def test_middle_truncation_keeps_head_and_tail(tok):
    body_start, body_end = "BEGIN of the text", "END of the text"
    prompt = topic_prompt(body_start + " the river and the lake" * 30 + " " + body_end)
    ids, truncated = encode_prompt(prompt, tok, budget=100)
    kept = tok.decode(ids)
    assert truncated and len(ids) == 100
    assert kept.startswith(f"{QUESTION}\n{OPTIONS}\nTitle: a river\nText: BEGIN")
    assert kept.endswith("END of the text\n\nAnswer:")
    assert kept.count("the lake") < 10  # most of the 30 repeats were dropped


def test_truncation_when_head_and_tail_do_not_fit(tok):
    prompt = topic_prompt("some text")
    ids, truncated = encode_prompt(prompt, tok, budget=8)
    answer_ids = tok("Answer:")["input_ids"]
    assert truncated and len(ids) == 8
    assert ids[-len(answer_ids):] == answer_ids
    assert tok.decode(ids).startswith("What")
    assert encode_prompt(prompt, tok, budget=1)[0] == answer_ids[-1:]


def test_single_line_prompt_keeps_both_ends(tok):
    prompt = "start " + "river " * 40 + "finish"
    kept = tok.decode(encode_prompt(prompt, tok, budget=12)[0])
    assert kept.startswith("start") and kept.endswith("finish")


def test_completion_is_never_cut(tok):
    prompt = topic_prompt("the old bank and the new market " * 20)
    completion = "Business news about trade"
    encoded = encode_for_training(Example(line=1, prompt=prompt, completion=completion), tok, max_length=40)
    completion_ids = encode_completion(" " + completion, tok, add_eos=True)
    assert encoded.truncated and len(encoded.input_ids) == 40
    assert encoded.input_ids[-len(completion_ids):] == completion_ids
    assert encoded.labels[-len(completion_ids):] == completion_ids
    assert set(encoded.labels[: -len(completion_ids)]) == {IGNORE_INDEX}
    assert tok.decode(encoded.input_ids).endswith("Answer: Business news about trade<|im_end|>")


def test_completion_longer_than_max_length_is_a_user_error(tok):
    example = Example(line=7, source="train.jsonl", prompt="Q:", completion="a very long answer " * 20)
    with pytest.raises(MoramError) as err:
        encode_for_training(example, tok, max_length=16)
    assert "--max-length 16" in assert_user_error(err, "train.jsonl:7")


def test_text_format_is_cut_at_the_end(tok):
    text = "the quick brown fox jumps over the lazy dog " * 5
    full = encode_for_training(Example(line=1, text=text), tok, max_length=1000)
    assert full.input_ids == tok(text)["input_ids"] + [tok.eos_token_id] == full.labels
    assert not full.truncated
    cut = encode_for_training(Example(line=1, text=text), tok, max_length=10)
    assert cut.input_ids == full.input_ids[:10] == cut.labels and cut.truncated


def test_encode_dataset_counts_truncated_examples(tok):
    long_prompt = topic_prompt("a big river near the old forest " * 20)
    examples = [
        Example(line=1, prompt=topic_prompt("goal"), completion="Sports"),
        Example(line=2, prompt=long_prompt, completion="World"),
        Example(line=3, prompt=long_prompt, completion="World"),
    ]
    encoded, truncated = encode_dataset(examples, tok, max_length=96)
    assert truncated == 2 and [e.truncated for e in encoded] == [False, True, True]
    assert all(len(e.input_ids) <= 96 for e in encoded)


def test_bos_is_kept_and_eos_never_ends_a_prompt(bos_eos_tok):
    bos, eos = bos_eos_tok.bos_token_id, bos_eos_tok.eos_token_id
    prompt = topic_prompt("the team lost")
    ids, _ = encode_prompt(prompt, bos_eos_tok, budget=1000)
    assert ids == bos_eos_tok(prompt)["input_ids"][:-1] and ids[0] == bos and ids[-1] != eos
    cut, truncated = encode_prompt(prompt, bos_eos_tok, budget=20)
    assert truncated and len(cut) == 20 and cut[0] == bos and cut.count(bos) == 1
    templated = "<|endoftext|>user: hi\nAnswer:"
    assert encode_prompt(templated, bos_eos_tok, budget=1000)[0].count(bos) == 1
    assert encode_completion("x", bos_eos_tok, add_eos=False) == bos_eos_tok("x", add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------- batching


def test_batches_are_deterministic_and_cover_every_index():
    lengths = [(i * 37) % 101 for i in range(523)]
    batches = length_bucketed_batches(lengths, batch_size=4, seed=3)
    assert batches == length_bucketed_batches(lengths, batch_size=4, seed=3)
    assert batches != length_bucketed_batches(lengths, batch_size=4, seed=4)
    assert sorted(i for batch in batches for i in batch) == list(range(523))
    assert sorted(len(batch) for batch in batches)[1:] == [4] * (len(batches) - 1)
    assert all([lengths[i] for i in batch] == sorted(lengths[i] for i in batch) for batch in batches)


def test_bucketing_reduces_padding():
    lengths = [(i * 37) % 101 + 1 for i in range(400)]
    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)
    bucketed = padding(length_bucketed_batches(lengths, batch_size=8, seed=0))
    assert bucketed < padding(length_bucketed_batches(lengths, batch_size=8, seed=0, shuffle=False)) / 4


def test_unshuffled_batches_are_consecutive():
    assert length_bucketed_batches([5, 1, 3, 2, 4], batch_size=2, seed=0, shuffle=False) == [[0, 1], [2, 3], [4]]
    assert length_bucketed_batches([], batch_size=2, seed=0) == []


def test_collate_right_pads():
    batch = [Encoded([5, 6, 7], [-100, 6, 7], False), Encoded([8], [8], False)]
    out = collate(batch, pad_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert all(tensor.dtype == torch.long for tensor in out.values())


# ---------------------------------------------------------------- fixtures end to end


def test_tiny_task_runs_through_the_tiny_model(tiny_task, tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    train, test = read_examples(tiny_task.train), read_examples(tiny_task.test, allow_text=False)
    assert (len(train), len(test)) == (24, 12)
    assert {e.completion for e in train} == set(tiny_task.labels)
    encoded, truncated = encode_dataset(train, tokenizer, max_length=128)
    assert truncated == 0
    batch = collate(encoded[:4], pad_id=tokenizer.pad_token_id)
    with torch.no_grad():
        loss = model(**batch).loss
    assert torch.isfinite(loss)
