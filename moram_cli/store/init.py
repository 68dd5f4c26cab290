"""`init_store`: create an empty store for a base model, from defaults, a recipe and overrides."""

from __future__ import annotations

from dataclasses import fields, replace
from datetime import datetime, timezone
from pathlib import Path

from moram_cli import __version__
from moram_cli.errors import MoramError
from moram_cli.models.reference import resolve_base_model
from moram_cli.store.config import DTYPES, GATE_SCOPES, KEY_INITS, METHODS, AdapterSettings, StoreConfig, TrainingSettings, _settings
from moram_cli.store.store import MemoryStore
from moram_cli.store.yamlio import read_yaml

# How a new moram store's later tasks start their keys, and how it routes: the winners of bench/plasticity.py (see the README).
DEFAULT_KEY_INIT = "data"
DEFAULT_ROUTING = "task"
DEFAULT_GATE_SCOPE = "bank"
# A store learned task after task routes by token or by task; source routing is for stores `moram merge` writes.
INIT_ROUTINGS = ("token", "task")


def init_store(
    store_path: Path, base_model: str | None = None, recipe: Path | None = None, dtype: str | None = None,
    method: str | None = None, trust_remote_code: bool = False, **overrides,
) -> dict:
    """Create the store at `store_path`; returns its config as a dict.

    Settings come from the built-in defaults, then the `recipe` YAML
    (sections `adapter:` and `training:`), then `overrides` (any
    AdapterSettings or TrainingSettings field; None keeps the value).
    `method` is moram (default), or one of the baselines lora and inclora.
    """
    if store_path.exists() and (not store_path.is_dir() or any(store_path.iterdir())):
        raise MoramError(f"{store_path}: already exists and is not empty; choose a new store directory or remove it first")
    adapter, training = _recipe_settings(recipe)
    given = {k: v for k, v in overrides.items() if v is not None}
    unknown = set(given) - {f.name for f in fields(AdapterSettings)} - {f.name for f in fields(TrainingSettings)}
    if unknown:
        raise TypeError(f"unknown setting(s) {sorted(unknown)}")
    adapter = replace(adapter, **{k: v for k, v in given.items() if k in adapter.__dataclass_fields__})
    training = replace(training, **{k: v for k, v in given.items() if k in training.__dataclass_fields__})
    dtype = dtype or "float32"
    if dtype not in DTYPES:
        raise MoramError(f"unknown --dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    method = method or "moram"
    if method not in METHODS:
        raise MoramError(f"unknown --method {method!r}; use one of {', '.join(METHODS)}")
    adapter = _method_adapter(adapter, method)
    _check_adapter(adapter)
    config = StoreConfig(
        base_model=resolve_base_model(base_model, trust_remote_code), adapter=adapter, training=training, method=method, dtype=dtype,
        tool_version=__version__, created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    MemoryStore.create(store_path, config)
    return {"store": str(store_path), **config.to_dict()}


def _recipe_settings(recipe: Path | None) -> tuple[AdapterSettings, TrainingSettings]:
    if recipe is None:
        return AdapterSettings(), TrainingSettings()
    data = read_yaml(recipe, "recipe", "check the --recipe path and its YAML")
    try:
        return _settings(AdapterSettings, data.get("adapter") or {}), _settings(TrainingSettings, data.get("training") or {})
    except (TypeError, ValueError) as exc:
        raise MoramError(f"{recipe}: {exc}; recipes hold 'adapter:' and 'training:' sections (see recipes/init/)") from None


# Each adapter setting a flag of `init` sets: the rule it must meet, and the rule in words.
ADAPTER_RULES = (
    ("r", lambda r: r >= 1, ">= 1"),
    # The gate keeps at least two ranks whatever k says (moram_cli.tuner.gating), so k = 1 acts as 2.
    ("k", lambda k: k >= 1, ">= 1"),
    ("temperature", lambda t: t > 0, "> 0"),
    ("dropout", lambda p: 0 <= p < 1, "0 <= dropout < 1"),
    ("threshold", lambda t: t >= 0, ">= 0"),
)


def _check_adapter(a: AdapterSettings) -> None:
    if a.key_init not in KEY_INITS:
        raise MoramError(f"invalid --key-init {a.key_init!r}; use one of {', '.join(KEY_INITS)}")
    if a.gate_scope not in GATE_SCOPES:
        raise MoramError(f"invalid --gate-scope {a.gate_scope!r}; use one of {', '.join(GATE_SCOPES)}")
    if a.routing not in INIT_ROUTINGS:
        raise MoramError(f"invalid --routing {a.routing!r}; use one of {', '.join(INIT_ROUTINGS)} (source routing is for stores moram merge writes)")
    for name, ok, need in ADAPTER_RULES:
        if not ok(getattr(a, name)):
            raise MoramError(f"invalid --{name} {getattr(a, name)!r}: need {need} (a flag, or the recipe's adapter section)")


def _method_adapter(a: AdapterSettings, method: str) -> AdapterSettings:
    """LoRA's alpha defaults to r: a scaling of 1, as MoRAM and IncLoRA apply, so the methods differ only in how ranks combine.
    New keys start from the task's data in MoRAM (at random under gate scope task) and at random in the baselines, as
    published; only MoRAM routes by task."""
    if a.routing is None:
        a = replace(a, routing=DEFAULT_ROUTING if method == "moram" else "token")
    if a.gate_scope is None:
        a = replace(a, gate_scope=DEFAULT_GATE_SCOPE if method == "moram" else "all")
    if a.key_init is None:
        # A bank that never meets another's experts starts as a first task's does.
        a = replace(a, key_init=DEFAULT_KEY_INIT if method == "moram" and a.gate_scope != "task" else "kaiming")
    if a.gate_scope != "all" and method != "moram":
        raise MoramError(f"--gate-scope {a.gate_scope} needs method moram; the {method} baseline has no gate, use --gate-scope all")
    if a.gate_scope in ("task", "weighted") and a.routing != "task":
        raise MoramError(f"--gate-scope {a.gate_scope} answers each input as its own task learned to, which needs --routing task, not {a.routing}")
    if a.routing == "task" and method != "moram":
        raise MoramError(f"--routing task needs method moram; the {method} baseline has no gate to route, use --routing token")
    if method != "lora":
        if a.lora_alpha is not None:
            raise MoramError(f"lora_alpha applies to --method lora only, not {method}; remove it from the recipe")
        return a
    if a.key_init != "kaiming":
        raise MoramError(f"--key-init {a.key_init} needs new ranks per task; method lora trains one adapter throughout, use --method moram or inclora")
    alpha = float(a.r) if a.lora_alpha is None else a.lora_alpha
    if alpha <= 0:
        raise MoramError(f"invalid adapter settings: lora_alpha must be > 0, got {alpha}")
    return replace(a, lora_alpha=alpha)
