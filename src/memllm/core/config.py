"""The memory hyperparameters of a memory model, read from (and written to) a Hugging Face config.json.

The published checkpoints keep these fields at the top level of a Llama config (SPEC §7); we keep the
same layout so that everything that loads the authors' checkpoints loads ours.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

# The base-model families memllm supports are `memllm.core.hf_compat.SUPPORTED_MODEL_TYPES`.
# The authors' own config class calls the model type "memoryllm"; it is a Llama underneath.
MODEL_TYPE_ALIASES = {"memoryllm": "llama", "mplus": "llama"}
ARCHITECTURES = {"MemoryLLM": "memoryllm", "MPlus": "mplus"}


@dataclass
class LoraSettings:
    """LoRA on q, k, v, gate, up, down (not o), as published: one adapter for injection
    (`default`), one for generation (`decoder_adapter`) when `add_decoder_lora` is set. The target
    names are the Llama family's module names (checked in tests/test_hf_compat.py)."""

    r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.1
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "v_proj", "k_proj", "up_proj", "down_proj", "gate_proj"]
    )
    inference_mode: bool = False


@dataclass
class MemoryConfig:
    """Memory fields of a MemoryLLM / M+ checkpoint (names as in the authors' config.json)."""

    kind: str = "memoryllm"  # "memoryllm" or "mplus"
    num_tokens: int = 256  # K: vectors written per injection
    num_blocks: int = 50  # N = num_blocks * K (M+: including the LTM blocks)
    add_bos_embedding: bool = True
    drop_memory_per_layer: bool = True
    add_decoder_lora: bool = False
    lora_config: LoraSettings | None = None
    # M+ only
    num_ltm_blocks: int = 0  # R = num_ltm_blocks * K long-term vectors retrieved per layer
    ltm_initial_size: int = 0
    update_ltm_mode: str = "immediate"
    update_ltm_frequency: int = 60
    decay_frequency: float = 1.0
    initial_rf_when_moving_stm_to_ltm: float = 10.0
    add_selector: bool = False
    selector_hidden_dim: int = 256
    num_selector_layers: int = 2
    add_encoder_retriever: bool = False
    map_from_hidden_states: bool = True
    detach_hidden_state: bool = True
    # memllm's fix of a quirk of the published code, whose short-term ages never grow (so a dropped
    # vector's age is its 0..K-1 index from its own injection). False reproduces the published
    # behaviour, which mplus-8b was trained with; True ages short-term vectors by K per update, so
    # the oldest-first order of retrieved vectors is their true order.
    stm_ages_grow: bool = False

    @property
    def num_memory_tokens(self) -> int:
        """N: short-term memory vectors per layer."""
        return (self.num_blocks - self.num_ltm_blocks) * self.num_tokens

    @property
    def num_retrieved(self) -> int:
        """R: long-term vectors retrieved per layer (M+)."""
        return self.num_ltm_blocks * self.num_tokens

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any]) -> "MemoryConfig":
        archs = raw.get("architectures") or []
        kind = next((ARCHITECTURES[a] for a in archs if a in ARCHITECTURES), None)
        if kind is None:
            kind = "mplus" if raw.get("num_ltm_blocks") else "memoryllm"
        names = {f.name for f in fields(cls)} - {"kind", "lora_config"}
        values = {k: raw[k] for k in names if k in raw and raw[k] is not None}
        lora = raw.get("lora_config")
        if lora:
            known = {f.name for f in fields(LoraSettings)}
            lora = LoraSettings(**{k: v for k, v in lora.items() if k in known})
        return cls(kind=kind, lora_config=lora or None, **values)

    def to_hf_dict(self) -> dict[str, Any]:
        """The fields written into config.json, with `architectures` as the authors name it."""
        out = asdict(self)
        kind = out.pop("kind")
        out["architectures"] = ["MPlus" if kind == "mplus" else "MemoryLLM"]
        if kind != "mplus":
            for name in [
                "num_ltm_blocks", "ltm_initial_size", "update_ltm_mode", "update_ltm_frequency",
                "decay_frequency", "initial_rf_when_moving_stm_to_ltm", "add_selector",
                "selector_hidden_dim", "num_selector_layers", "add_encoder_retriever",
                "map_from_hidden_states", "detach_hidden_state", "stm_ages_grow",
            ]:
                out.pop(name)
        return out
