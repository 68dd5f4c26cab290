"""`store.yaml`: what a store was built on and how it learns."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from moram_cli.errors import MoramError
from moram_cli.models.reference import BaseModelRef
from moram_cli.store.yamlio import read_yaml, write_yaml

FORMAT_VERSION = 1
CONFIG_FILE = "store.yaml"
# moram; lora: one PEFT LoRA adapter trained on task after task (SeqLoRA); inclora: a new LoRA per task, old ones
# frozen, all summed without a gate (IncLoRA). The two baselines share the store, training and evaluation code.
METHODS = ("moram", "lora", "inclora")
# token: every rank competes for every token (the method); task: at inference each sequence is answered by the banks up
# to the task it resembles most (by the prototypes its banks record); source: a merged store answers each sequence with
# the banks of one source store, recorded per bank as `routing_groups` (moram_cli.tuner.routing).
ROUTINGS = ("token", "task", "source")
# How a later task's new keys start: at random as the method is written, from the task's own inputs, or copied from
# the previous bank (moram_cli.training.key_init).
KEY_INITS = ("kaiming", "data", "warm")
# Over which ranks the gate normalises, keeps k and softmaxes: all at once (the method), each bank's apart, the banks'
# outputs added (moram_cli.tuner.gating), or the sequence's own task's bank alone: a task is learned on the bare model
# plus its new bank, and task routing answers each sequence with the one bank of its nearest task. `weighted` gates as
# `bank` does, and each task learns a gain per earlier bank by which its answers weigh that bank's output (between
# `bank`, every gain 1, and `task`, every gain 0), so a task can turn down the earlier banks that hinder it.
GATE_SCOPES = ("all", "bank", "task", "weighted")
# The base model's dtype, by its torch name (moram_cli.models.loading).
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class AdapterSettings:
    """The adapter's hyper-parameters, fixed for the life of a store.

    k, temperature and threshold configure MoRAM's gate; `lora_alpha` is set
    for method lora only (its output is scaled by lora_alpha / r). `routing`
    is "token" or "task" (set by `init`), or "source" in stores `moram merge`
    wrote that way. `key_init` says how a later task's new keys start
    (moram_cli.training.key_init), `gate_scope` over which ranks the gate
    runs. All three are None only until `init` picks the method's
    default.
    """

    r: int = 8
    k: int = 4
    temperature: float = 0.03
    threshold: float = 0.0
    dropout: float = 0.0
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "k_proj"])
    lora_alpha: float | None = None
    routing: str | None = None
    key_init: str | None = None
    gate_scope: str | None = None


@dataclass
class TrainingSettings:
    """Defaults for `learn-task`; each can be overridden by a flag on the command.

    `batch_size` is the global batch of one optimiser step, whatever the
    number of processes and `grad_accum` steps it is split into. `precision`
    "auto" is bf16 autocast on a GPU that supports it, fp32 elsewhere.
    `max_steps` (None: no limit) caps the steps `epochs` asks for;
    `checkpoint_every` steps (0: never) the resume data is saved;
    `max_grad_norm` (None: off) clips the trainable ranks' gradient norm.

    `lr` trains the first task; `later_lr` (None: `lr` too) every task after
    it. `gain_lr` trains the earlier-bank gains of gate scope weighted: they
    start at 1 and an Adam step moves each by about the rate, so a task's
    rate would leave them nearly where they start. A later task's fresh experts compete in the gate with trained ones, and
    a large step lets them take over tokens the old experts served: on
    SmolLM2-135M, DBpedia (learnt at 2e-3) kept 0.76 of its 0.78 accuracy when
    Amazon followed at 5e-4, 0.71 at 1e-3 and 0.58 at 2e-3; learning the first
    task at 5e-4 reached only 0.21.
    """

    epochs: float = 1.0
    lr: float = 2e-3
    later_lr: float | None = 5e-4
    gain_lr: float = 5e-2
    batch_size: int = 8
    max_length: int = 512
    seed: int = 0
    weight_decay: float = 0.0
    lr_schedule: str = "constant"
    grad_accum: int = 1
    precision: str = "auto"
    gradient_checkpointing: bool = False
    max_steps: int | None = None
    checkpoint_every: int = 50
    max_grad_norm: float | None = None


@dataclass
class StoreConfig:
    base_model: BaseModelRef
    adapter: AdapterSettings = field(default_factory=AdapterSettings)
    training: TrainingSettings = field(default_factory=TrainingSettings)
    method: str = "moram"
    dtype: str = "float32"
    format_version: int = FORMAT_VERSION
    tool_version: str = ""
    created: str = ""

    def to_dict(self) -> dict:
        data = asdict(self)
        data["base_model"] = self.base_model.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict, where: Path) -> "StoreConfig":
        try:
            return cls(
                base_model=BaseModelRef.from_dict(data["base_model"]),
                # Stores written before these settings existed drew every task's keys at random and gated every token
                # over all ranks.
                adapter=_settings(AdapterSettings, {"key_init": "kaiming", "routing": "token", "gate_scope": "all", **data.get("adapter", {})}),
                training=_settings(TrainingSettings, data.get("training", {})),
                **{k: data[k] for k in ("method", "dtype", "format_version", "tool_version", "created") if k in data},
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise MoramError(f"{where}: store config is corrupt (bad or missing {exc}); restore it from a backup") from None

    def save(self, store_dir: Path) -> None:
        write_yaml(store_dir / CONFIG_FILE, self.to_dict())

    @classmethod
    def load(cls, store_dir: Path) -> "StoreConfig":
        path = store_dir / CONFIG_FILE
        data = read_yaml(path, "store config")
        version = data.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise MoramError(f"{path}: store format version {version} is newer than this moram understands ({FORMAT_VERSION}); upgrade moram")
        return cls.from_dict(data, path)


def _settings(kind, values: dict):
    known = {f.name for f in fields(kind)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"unknown setting {sorted(unknown)[0]!r}")
    return kind(**values)
