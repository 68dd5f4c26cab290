"""Hostile JSONL: whatever bytes a data file holds, moram reads examples from it or refuses it in one clean line.

Property-based with hypothesis, derandomised, so every run (and CI) sees the same cases.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from conftest import snapshot
from moram_cli.cli import app
from moram_cli.data.jsonl import Example, read_examples
from moram_cli.errors import MoramError

runner = CliRunner()
BOM = b"\xef\xbb\xbf"
FUZZ = {"deadline": None, "derandomize": True, "database": None}

# Any code point but lone surrogates (JSON cannot carry them raw): NULs, controls, escapes, emoji.
_text = st.text(max_size=12)
_scalars = st.none() | st.booleans() | st.integers() | st.floats() | _text
_keys = st.sampled_from(["prompt", "completion", "messages", "text", "role", "content"]) | st.text(max_size=4)
_junk = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_keys, inner, max_size=4), max_leaves=12)
_message = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system"]) | _junk, "content": _text | _junk})
_prompt_rows = st.fixed_dictionaries({"prompt": _text, "completion": _text.filter(bool)})
_rows = st.one_of(
    _prompt_rows,
    st.fixed_dictionaries({"messages": st.tuples(_message, _message).map(list) | st.lists(_message | _junk, max_size=3) | _junk}),
    st.fixed_dictionaries({"prompt": _text | _junk, "completion": _text | _junk}),
    st.fixed_dictionaries({"text": _text | _junk}),
    st.dictionaries(_keys, _junk, max_size=4),  # {} and unknown fields
    _junk,  # arrays and bare scalars
)
_raw = st.binary(max_size=40) | st.sampled_from([
    b"", b"  \t", b"\r", b"\x00", BOM + b"{}", b"\xff\xfe{}", b'{"text": "a\x00b"}', b'{"text": "\\u0000\\u001b[31m"}',
    b'{"prompt": "\\udfff", "completion": "x"}', b"[" * 5000, b'{"text": "' + b"x" * 200_000 + b'"}', b'{"prompt": "' + b"y" * 200_000,
])
_lines = st.builds(lambda row, ascii: json.dumps(row, ensure_ascii=ascii).encode(), _rows, st.booleans()) | _raw


@st.composite
def jsonl_files(draw, lines: st.SearchStrategy[bytes] = _lines) -> bytes:
    """Those lines, after a BOM or not, ended by LF or CRLF, with a final line end or not."""
    end = draw(st.sampled_from([b"\n", b"\r\n"]))
    body = end.join(draw(st.lists(lines, max_size=6)))
    return draw(st.sampled_from([b"", BOM])) + body + draw(st.sampled_from([b"", end]))


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "data.jsonl"


def outcome(path: Path) -> list[Example] | str:
    """The examples of `path`, or the message it is refused with, checked to be one printable line naming the file."""
    try:
        return read_examples(path)
    except MoramError as err:
        message = str(err)
        assert message.startswith(f"{path}") and message.isprintable(), message
        return message


@settings(max_examples=100, **FUZZ)
@given(content=jsonl_files())
def test_any_file_reads_or_is_refused_in_one_line(data_file, content):
    data_file.write_bytes(content)
    examples = outcome(data_file)
    if not isinstance(examples, str):
        assert examples and len({example.kind for example in examples}) == 1
        assert all(isinstance(value, str) for ex in examples for value in (ex.prompt, ex.completion, ex.text) if value is not None)


@settings(max_examples=50, **FUZZ)
@given(rows=st.lists(_prompt_rows | st.sampled_from([b"", b"  ", b"\t"]), min_size=1, max_size=6),
       bom=st.sampled_from([b"", BOM]), end=st.sampled_from([b"\n", b"\r\n"]))
def test_bom_crlf_and_blank_lines_change_nothing_read(data_file, rows, bom, end):
    lines = [row if isinstance(row, bytes) else json.dumps(row, ensure_ascii=False).encode() for row in rows]
    data_file.write_bytes(bom + end.join(lines) + end)
    expected = [(number, row["prompt"], row["completion"]) for number, row in enumerate(rows, start=1) if isinstance(row, dict)]
    result = outcome(data_file)
    if expected:
        assert [(ex.line, ex.prompt, ex.completion) for ex in result] == expected
    else:
        assert "no examples" in result


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_model_dir) -> Path:
    path = tmp_path_factory.mktemp("fuzz_store") / "store"
    assert runner.invoke(app, ["init", str(path), "--base-model", str(tiny_model_dir), "--r", "1"]).exit_code == 0
    return path


_task_numbers = itertools.count(1)


@settings(max_examples=40, **FUZZ)
@given(content=jsonl_files())
def test_learn_task_trains_or_fails_in_one_line(store, data_file, content):
    data_file.write_bytes(content)
    examples = outcome(data_file)
    before = snapshot(store)
    args = ["learn-task", str(store), "--data", str(data_file), "--name", f"case{next(_task_numbers)}", "--epochs", "0.01", "--json"]
    result = runner.invoke(app, args)
    assert "Traceback" not in result.output and result.exit_code in (0, 2), result.output
    if result.exit_code == 0:
        assert json.loads(result.stdout)["examples"] == len(examples)
        return
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1 and result.stderr.strip().isprintable()
    assert snapshot(store) == before
    if isinstance(examples, str):
        assert result.stderr == f"error: {examples}\n"
