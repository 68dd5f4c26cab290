"""moram: continual learning of language models with incremental rank-1 associative memory experts.

`moram_cli.load(store)` returns a learned store as a transformers model and its tokenizer (see `moram_cli.api.load`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["__version__", "load"]

if TYPE_CHECKING:
    from moram_cli.api import load


def __getattr__(name: str) -> Any:
    # `moram --help` imports this package; torch and transformers load only when `load` is first used.
    if name == "load":
        from moram_cli.api import load

        return load
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), "load"])
