"""The MoRAM adapter, organised like a PEFT tuner: config, layer, injection model; PEFT's LoRA behind the same interface."""

from moram_cli.tuner.config import MoramConfig
from moram_cli.tuner.gating import rank_gate
from moram_cli.tuner.layer import MoramLayer
from moram_cli.tuner.model import MoramModel
from moram_cli.tuner.seqlora import SeqLoraModel

__all__ = ["MoramConfig", "MoramLayer", "MoramModel", "SeqLoraModel", "rank_gate"]
