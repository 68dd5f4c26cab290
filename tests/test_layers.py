"""Layers import downward only (issue #21): `moram_cli/store/` is persistence, so it never builds or loads a model.

The rule, for every import statement of every module in store/, at module level or inside a function:
- from moram_cli only what lies below the store: the package version, `errors`, the shared helpers `hashing` and
  `safe_text`, the base-model reference a store records (`models.reference`), and store/ itself. Evaluation,
  inspection, training, curation (the operations that run a store's model), the tuner and the model assembly
  (`models.memory`, `models.loading`) sit above it;
- no torch, transformers, peft or accelerate. The one exception is `safetensors.torch`, imported inside the
  functions that write a bank's file: it serialises tensors a model already produced, which is persistence and
  builds nothing, and imported there it costs the commands that never write a bank (verify, inspect-ranks) nothing.
Imports under `if TYPE_CHECKING:` never run, so they may name torch for type hints.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import moram_cli

PACKAGE = Path(moram_cli.__file__).parent
STORE = PACKAGE / "store"
BELOW_STORE = ("moram_cli.errors", "moram_cli.hashing", "moram_cli.safe_text", "moram_cli.models.reference", "moram_cli.store")
HEAVY = ("torch", "transformers", "peft", "accelerate")
TENSOR_FILES = "safetensors.torch"


def within(name: str, packages: tuple[str, ...]) -> bool:
    return any(name == package or name.startswith(f"{package}.") for package in packages)


def is_module(name: str) -> bool:
    """Whether `name` may be a module: any name outside moram_cli (`from safetensors import torch`), in it only a file or folder."""
    if not name.startswith("moram_cli."):
        return True
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or path.is_dir()


def imported(module: str, tree: ast.Module) -> list[tuple[int, str, bool]]:
    """(line, module named, inside a function) for every import that can run; `from X import n` names X, and X.n where it may be a module."""
    hidden = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
              for statement in block.body for node in ast.walk(statement)}
    lazy = {id(node) for function in ast.walk(tree) if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef))
            for node in ast.walk(function)}
    found = []
    for node in ast.walk(tree):
        if id(node) in hidden:
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            package = module.split(".")[: -node.level] if node.level else []
            base = ".".join([*package, *([node.module] if node.module else [])])
            names = [base, *(f"{base}.{alias.name}" for alias in node.names if is_module(f"{base}.{alias.name}"))]
        else:
            continue
        found += [(node.lineno, name, id(node) in lazy) for name in names]
    return found


@pytest.mark.parametrize("path", sorted(STORE.glob("*.py")), ids=lambda path: path.name)
def test_the_store_imports_only_downward(path):
    for line, name, lazy in imported(f"moram_cli.store.{path.stem}", ast.parse(path.read_text(), str(path))):
        where = f"{path.name}:{line} imports {name}"
        if name.startswith("moram_cli."):
            assert within(name, BELOW_STORE), f"{where}, a layer above the store"
        assert not within(name, HEAVY), f"{where}: the store never builds or loads a model"
        assert lazy or not within(name, (TENSOR_FILES,)), f"{where} at import time; import it where a bank is written"


def test_the_check_sees_lazy_and_relative_imports_and_skips_type_hints():
    source = """
from typing import TYPE_CHECKING
from . import bank
from moram_cli import evaluation, __version__
if TYPE_CHECKING:
    import torch
def load():
    from moram_cli.models.memory import build_memory_model
"""
    assert imported("moram_cli.store.x", ast.parse(source)) == [
        (2, "typing", False), (2, "typing.TYPE_CHECKING", False), (3, "moram_cli.store", False), (3, "moram_cli.store.bank", False),
        (4, "moram_cli", False), (4, "moram_cli.evaluation", False), (8, "moram_cli.models.memory", True),
    ]


# Run in a fresh interpreter (this one imported torch long ago): the heavy libraries loaded once every store module is.
PROBE = """
import importlib, json, sys
for module in sys.argv[2:]:
    importlib.import_module(module)
print(json.dumps([name for name in json.loads(sys.argv[1]) if name in sys.modules]))
"""


def test_importing_the_store_loads_no_model_library():
    modules = [f"moram_cli.store.{path.stem}".removesuffix(".__init__") for path in sorted(STORE.glob("*.py"))]
    done = subprocess.run([sys.executable, "-c", PROBE, json.dumps(HEAVY), *modules], cwd=PACKAGE.parent, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []
