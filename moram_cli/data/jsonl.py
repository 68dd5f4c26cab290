"""Reading and validating JSONL example files.

Each line is one example in one of three formats: prompt/completion, chat
messages, or plain text for language modelling. Every mistake a user can make
in such a file becomes a one-line `MoramError` naming `file:line`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moram_cli.errors import MoramError
from moram_cli.safe_text import one_line

FORMATS_HINT = 'each line needs {"prompt": ..., "completion": ...}, {"messages": [...]} or {"text": ...}'
_FORMAT_KEYS = {"prompt": ("prompt", "completion"), "messages": ("messages",), "text": ("text",)}
_FORMAT_NAMES = {"prompt": "prompt/completion", "messages": "messages", "text": "text"}
_JSON_TYPE_NAMES = {
    dict: "an object", list: "an array", str: "a string", bool: "a boolean",
    int: "a number", float: "a number", type(None): "null",
}
_UTF8_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class Example:
    """One validated line; exactly one of the three formats is filled in.

    `source` is the file as the user named it, kept so that later stages
    (tokenisation) can still point at `file:line`.
    """

    line: int
    prompt: str | None = None
    completion: str | None = None
    messages: tuple[dict, ...] | None = None
    text: str | None = None
    source: str = ""

    @property
    def kind(self) -> str:
        """"prompt", "messages" or "text"."""
        if self.messages is not None:
            return "messages"
        return "text" if self.text is not None else "prompt"

    @property
    def where(self) -> str:
        """`file:line`, the prefix of every error message about this example."""
        return f"{self.source}:{self.line}" if self.source else f"line {self.line}"


def read_examples(path: Path, *, allow_text: bool = True) -> list[Example]:
    """All examples of a JSONL file, checked line by line and to share one format.

    `allow_text=False` is for evaluation, which needs a target to score.
    """
    source = one_line(str(path), limit=200)
    examples: list[Example] = []
    for number, raw in enumerate(_read_bytes(path, source).split(b"\n"), start=1):
        if raw.strip():
            examples.append(_parse_line(raw, Example(line=number, source=source)))
            _check_format(examples, allow_text)
    if not examples:
        raise MoramError(f"{source}: no examples (the file is empty or only blank lines); {FORMATS_HINT}")
    return examples


def _read_bytes(path: Path, source: str) -> bytes:
    if path.is_dir():
        raise MoramError(f"{source}: is a directory, not a data file; give the path of a .jsonl file to --data")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise MoramError(f"{source}: data file not found; check the path given to --data") from None
    except OSError as err:
        raise MoramError(f"{source}: cannot read the data file ({one_line(err.strerror or str(err))})") from None
    return data.removeprefix(_UTF8_BOM)


def _parse_line(raw: bytes, at: Example) -> Example:
    """The example on one non-blank line; `at` carries only its position."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise MoramError(f"{at.where}: not valid UTF-8 (byte {err.start + 1}); save the file as UTF-8") from None
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as err:
        # ValueError also covers integers too long to convert; RecursionError, absurd nesting.
        raise MoramError(f"{at.where}: invalid JSON ({one_line(str(err))}): {one_line(text)}") from None
    if not isinstance(value, dict):
        raise MoramError(f"{at.where}: line is {_JSON_TYPE_NAMES[type(value)]}, not a JSON object; {FORMATS_HINT}")
    return _example_from(value, at)


def _example_from(row: dict[str, Any], at: Example) -> Example:
    kind, where = _detect_kind(row, at.where), at.where
    if kind == "messages":
        return Example(line=at.line, messages=_messages(row["messages"], where), source=at.source)
    if kind == "text":
        return Example(line=at.line, text=_field(row, "text", where, non_empty=True), source=at.source)
    prompt = _field(row, "prompt", where, non_empty=False)
    completion = _field(row, "completion", where, non_empty=True)
    return Example(line=at.line, prompt=prompt, completion=completion, source=at.source)


def _detect_kind(row: dict[str, Any], where: str) -> str:
    kinds = [kind for kind, keys in _FORMAT_KEYS.items() if any(key in row for key in keys)]
    if not kinds:
        found = one_line(", ".join(repr(key) for key in row)) or "none"
        raise MoramError(f"{where}: no known fields (found {found}); {FORMATS_HINT}")
    if len(kinds) > 1:
        mixed = " and ".join(_FORMAT_NAMES[kind] for kind in kinds)
        raise MoramError(f"{where}: line mixes the {mixed} formats; use exactly one per line")
    return kinds[0]


def _field(row: dict[str, Any], key: str, where: str, *, non_empty: bool) -> str:
    if key not in row:
        raise MoramError(f"{where}: missing field {key!r}; {FORMATS_HINT}")
    return _checked_str(row[key], repr(key), where, non_empty=non_empty)


def _checked_str(value: Any, name: str, where: str, *, non_empty: bool) -> str:
    if not isinstance(value, str):
        raise MoramError(f"{where}: field {name} must be a string, got {_JSON_TYPE_NAMES[type(value)]}")
    if non_empty and not value:
        raise MoramError(f"{where}: field {name} is empty; it must contain text")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        # json.loads accepts "\ud800"-style escapes, which no tokenizer can encode.
        raise MoramError(f"{where}: field {name} contains an unpaired surrogate escape (like \\ud800)") from None
    return value


def _messages(value: Any, where: str) -> tuple[dict, ...]:
    if not isinstance(value, list) or not value:
        raise MoramError(f"{where}: field 'messages' must be a non-empty list of " '{"role": ..., "content": ...}')
    for index, message in enumerate(value):
        _check_message(message, f"messages[{index}]", where)
    last = value[-1]
    if last["role"] != "assistant":
        role = one_line(last["role"])
        raise MoramError(f"{where}: the last message must have role 'assistant' (the target), not {role!r}")
    _checked_str(last["content"], f"messages[{len(value) - 1}].content", where, non_empty=True)
    if len(value) == 1:
        # Chat templates refuse an empty conversation, so the prompt needs at least one message.
        raise MoramError(f"{where}: 'messages' needs at least one message (e.g. the user's) before the assistant's")
    return tuple(dict(message) for message in value)


def _check_message(message: Any, name: str, where: str) -> None:
    if not isinstance(message, dict):
        raise MoramError(f'{where}: {name} must be an object like {{"role": "user", "content": "..."}}')
    for key in ("role", "content"):
        if key not in message:
            raise MoramError(f"{where}: {name} has no {key!r}; every message needs 'role' and 'content'")
        _checked_str(message[key], f"{name}.{key}", where, non_empty=key == "role")


def _check_format(examples: list[Example], allow_text: bool) -> None:
    """The newest example must share the first one's format, and be scorable if evaluating."""
    newest, first = examples[-1], examples[0]
    if newest.kind == "text" and not allow_text:
        raise MoramError(
            f'{newest.where}: plain {{"text": ...}} lines cannot be scored; evaluation needs '
            f'{{"prompt": ..., "completion": ...}} or {{"messages": [...]}} lines'
        )
    if newest.kind != first.kind:
        raise MoramError(
            f"{newest.where}: uses the {_FORMAT_NAMES[newest.kind]} format but line {first.line} uses "
            f"{_FORMAT_NAMES[first.kind]}; every line must use the same format"
        )
