"""Tokenising examples for causal language models.

Prompt and completion are tokenised separately and concatenated, so the loss
mask starts exactly at the first completion token. Prompts that do not fit
are cut in the middle: the instruction and option list at the head and the
final "Answer:" line at the tail are what the model needs to answer.
"""

from __future__ import annotations

from dataclasses import dataclass

from jinja2 import TemplateError

from moram_cli.data.jsonl import Example
from moram_cli.errors import MoramError
from moram_cli.safe_text import one_line

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Encoded:
    """One tokenised example; `labels` is IGNORE_INDEX where there is no loss."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool


def separator(prompt: str, completion: str) -> str:
    """The space put between a prompt and its completion, unless one side already has whitespace."""
    if not prompt or prompt[-1].isspace() or completion[:1].isspace():
        return ""
    return " "


def split_example(example: Example, tokenizer) -> tuple[str, str]:
    """(prompt, completion) text of a prompt or messages example; the completion carries the separator."""
    if example.kind == "messages":
        return _chat_prompt(example, tokenizer), example.messages[-1]["content"]
    if example.kind == "prompt":
        return example.prompt, separator(example.prompt, example.completion) + example.completion
    raise ValueError(f"{example.where}: a text example has no prompt/completion split")


def _chat_prompt(example: Example, tokenizer) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise MoramError(
            f"{example.where}: messages lines need a chat template and this model's tokenizer has none; "
            "use prompt/completion lines instead"
        )
    try:
        return tokenizer.apply_chat_template(
            list(example.messages[:-1]), add_generation_prompt=True, tokenize=False
        )
    except TemplateError as err:
        raise MoramError(
            f"{example.where}: the model's chat template rejected these messages ({one_line(str(err))})"
        ) from None


def encode_prompt(prompt: str, tokenizer, budget: int) -> tuple[list[int], bool]:
    """Token ids of `prompt` (leading BOS included, never a trailing EOS), cut in the middle to `budget`.

    Returns the ids and whether the prompt did not fit whole. A prompt that
    fits is tokenised whole, exactly as the tokenizer would do it; one that
    does not is tokenised in pieces (head, body, tail) and its body thinned.
    """
    prefix = _bos_prefix(prompt, tokenizer)
    ids = prefix + _plain_ids(prompt, tokenizer)
    if len(ids) <= budget:
        return ids, False
    head, body, tail = (_plain_ids(piece, tokenizer) for piece in _split_prompt(prompt))
    return prefix + _fit(head, body, tail, max(budget - len(prefix), 0)), True


def _plain_ids(text: str, tokenizer) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _bos_prefix(prompt: str, tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before any text (a BOS, or nothing).

    A chat-templated prompt that already spells out the BOS gets none, so the
    BOS is never doubled.
    """
    bos = tokenizer.bos_token
    if bos and prompt.startswith(bos):
        return []
    specials = set(tokenizer.all_special_ids)
    probe = tokenizer("a")["input_ids"]
    count = next((i for i, token in enumerate(probe) if token not in specials), len(probe))
    return probe[:count]


def _split_prompt(prompt: str) -> tuple[str, str, str]:
    """(head, body, tail) with head + body + tail == prompt.

    head runs up to and including the first "Option:" line (else the first
    line), tail is the last line (with any trailing newlines); a one-line
    prompt is all body, so its start and end are what survives a cut.
    """
    core = prompt.rstrip("\n")
    lines = core.split("\n")
    if len(lines) == 1:
        return "", prompt, ""
    options = [i for i, line in enumerate(lines[:-1]) if line.startswith("Option:")]
    head_end = options[0] + 1 if options else 1
    head = "".join(line + "\n" for line in lines[:head_end])
    body = "".join(line + "\n" for line in lines[head_end:-1])
    return head, body, prompt[len(head) + len(body):]


def _fit(head: list[int], body: list[int], tail: list[int], budget: int) -> list[int]:
    """head + body + tail in at most `budget` ids, dropping from the middle of the body first."""
    room = budget - len(head) - len(tail)
    if len(body) <= room:
        # Tokenised in pieces the prompt can come out shorter than whole; then nothing is dropped.
        return head + body + tail
    if room >= 0:
        keep_end = room // 2
        return head + body[: room - keep_end] + body[len(body) - keep_end:] + tail
    if len(tail) >= budget:
        return tail[len(tail) - budget:]
    return head[: budget - len(tail)] + tail


def encode_completion(completion: str, tokenizer, add_eos: bool) -> list[int]:
    """Token ids of the completion, without special tokens, plus EOS if asked and the tokenizer has one."""
    ids = _plain_ids(completion, tokenizer)
    if add_eos and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids


def encode_for_training(example: Example, tokenizer, max_length: int) -> Encoded:
    """input_ids and labels of one example in at most `max_length` tokens; only the prompt is ever cut."""
    if example.kind == "text":
        return _encode_text(example.text, tokenizer, max_length)
    prompt, completion = split_example(example, tokenizer)
    completion_ids = encode_completion(completion, tokenizer, add_eos=True)
    if len(completion_ids) >= max_length:
        raise MoramError(
            f"{example.where}: the completion is {len(completion_ids)} tokens, leaving no room for the "
            f"prompt within --max-length {max_length}; raise --max-length or shorten the completion"
        )
    prompt_ids, truncated = encode_prompt(prompt, tokenizer, max_length - len(completion_ids))
    labels = [IGNORE_INDEX] * len(prompt_ids) + completion_ids
    return Encoded(input_ids=prompt_ids + completion_ids, labels=labels, truncated=truncated)


def _encode_text(text: str, tokenizer, max_length: int) -> Encoded:
    ids = _bos_prefix(text, tokenizer) + encode_completion(text, tokenizer, add_eos=True)
    truncated = len(ids) > max_length
    ids = ids[:max_length]
    return Encoded(input_ids=ids, labels=list(ids), truncated=truncated)


def check_context(tokenizer, max_length: int) -> None:
    """Refuse a `max_length` beyond the model's context, which loading the base model puts in `tokenizer.model_max_length`.

    Past it, positions the model never learned would score and train
    silently, or fail deep inside its forward pass.
    """
    limit = tokenizer.model_max_length
    if max_length > limit:
        raise MoramError(f"--max-length {max_length} is beyond the model's context of {limit} tokens; give --max-length {limit} or less")


def encode_dataset(examples: list[Example], tokenizer, max_length: int) -> tuple[list[Encoded], int]:
    """Every example encoded for training, and how many of them had to be truncated."""
    check_context(tokenizer, max_length)
    encoded = [encode_for_training(example, tokenizer, max_length) for example in examples]
    return encoded, sum(item.truncated for item in encoded)
