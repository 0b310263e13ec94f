"""Reading and writing memory models in the authors' Hugging Face format (SPEC §7).

The base weights go through transformers' `from_pretrained` (so dtype, device_map, sharding and
every Llama-family architecture work the usual way); everything transformers does not know (memory,
bos vector, positional vector, LoRA adapters, M+ retriever and long-term memory) we load ourselves.
Every key in the checkpoint must be consumed and every parameter set, or loading fails and says
which: users of newer peft silently lost the decoder adapter and got ~0% accuracy.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import snapshot_download, split_torch_state_dict_into_shards
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
)
from transformers.utils import logging as hf_logging

from memllm.core.config import MODEL_TYPE_ALIASES, LoraSettings, MemoryConfig
from memllm.core.hf_compat import SUPPORTED_MODEL_TYPES
from memllm.core.ltm import LongTermMemory
from memllm.core.model import MemoryModel
from memllm.core.mplus import empty_ltm, ltm_config

log = logging.getLogger(__name__)

# LoRA-wrapped projections are stored as `<module>.base_layer.weight`; transformers sees `<module>.weight`.
_BASE_LAYER_MAPPING = {r"\.base_layer\.": "."}
_LTM_PREFIXES = ("ltm.", "ltm_keys.", "ltm_ages.", "ltm_recall_frequencies.")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as a memory model; the message says why."""


# Our own tiny models (`memllm recipe tiny`), shipped inside the package: loadable by name.
SHIPPED = {"tiny-memoryllm": "memoryllm", "tiny-mplus": "mplus"}


def shipped_path(name: str) -> Path:
    """The package directory of a shipped tiny model ("tiny-memoryllm" or "tiny-mplus")."""
    path = Path(__file__).parents[1] / "recipes" / "assets" / "tiny" / SHIPPED[name]  # package data, not an import
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{name} is not in this installation ({path} is missing); "
                              "`memllm recipe tiny --out DIR` trains it")
    return path


def resolve(path_or_id: str | os.PathLike) -> Path:
    """A local directory, a shipped tiny model's name, or a Hugging Face hub id downloaded into the
    local cache."""
    if str(path_or_id) in SHIPPED and not Path(path_or_id).exists():
        return shipped_path(str(path_or_id))
    path = Path(path_or_id)
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; a checkpoint is a directory with config.json and safetensors")
    name = str(path_or_id)
    if name.count("/") != 1 or name.startswith((".", "/")):
        raise CheckpointError(f"checkpoint not found: {name} is neither a local directory nor a hub id")
    try:
        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as e:  # network, auth, missing repo: all end the same way for the user
        raise CheckpointError(f"could not fetch {name} from the hub ({type(e).__name__}: {e})") from e


def read_hf_config(path: Path) -> tuple[dict[str, Any], PretrainedConfig]:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path} has no config.json")
    try:
        raw = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_file} is not valid JSON ({e})") from e
    model_type = MODEL_TYPE_ALIASES.get(raw.get("model_type"), raw.get("model_type"))
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"unsupported architecture model_type={raw.get('model_type')!r}: memllm supports the Llama family "
            f"({', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    fields = {k: v for k, v in raw.items() if k not in ("model_type", "architectures", "transformers_version")}
    return raw, AutoConfig.for_model(model_type, **fields)


def checkpoint_files(path: Path) -> dict[str, Path]:
    """Map every tensor name of the checkpoint to the safetensors file that holds it."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {k: path / v for k, v in weight_map.items()}
    single = path / "model.safetensors"
    if not single.is_file():
        raise CheckpointError(f"{path} has no model.safetensors (or model.safetensors.index.json)")
    try:
        with safe_open(str(single), framework="pt") as f:
            return {k: single for k in f.keys()}
    except SafetensorError as e:
        raise CheckpointError(f"{single} is corrupt ({e})") from e


def _read_tensors(files: dict[str, Path], names: list[str]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for n in names:
        by_file.setdefault(files[n], []).append(n)
    for file, keys in by_file.items():
        try:
            with safe_open(str(file), framework="pt") as f:
                for k in keys:
                    out[k] = f.get_tensor(k)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{file} is corrupt or unreadable ({e})") from e
    return out


def load(
    path_or_id: str | os.PathLike,
    dtype: torch.dtype | str | None = None,
    device_map: str | dict | None = None,
    load_tokenizer: bool = True,
) -> MemoryModel:
    """Load a MemoryLLM / M+ checkpoint (the authors' or ours).

    dtype and device_map are transformers' options: a model larger than one GPU spreads over several.
    """
    path = resolve(path_or_id)
    raw, hf_config = read_hf_config(path)
    memory_config = MemoryConfig.from_hf_dict(raw)
    files = checkpoint_files(path)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if dtype is None:
        dtype = getattr(torch, str(raw.get("torch_dtype") or raw.get("dtype") or "float32"))

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # the memory keys are "unexpected" to transformers; we take them below
    hf_logging.disable_progress_bar()
    try:
        lm, info = AutoModelForCausalLM.from_pretrained(
            path, config=hf_config, dtype=dtype, device_map=device_map,
            key_mapping=_BASE_LAYER_MAPPING, output_loading_info=True,
        )
    except (OSError, SafetensorError, RuntimeError) as e:
        raise CheckpointError(f"could not load the base weights from {path} ({e})") from e
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    if info["missing_keys"]:
        raise CheckpointError(f"checkpoint {path} lacks base weights: {sorted(info['missing_keys'])[:8]}")
    if info.get("mismatched_keys"):
        raise CheckpointError(f"checkpoint {path} has weights of the wrong shape: {sorted(info['mismatched_keys'])[:8]}")
    lm.eval()

    model = MemoryModel(lm, memory_config)
    ours = set(info["unexpected_keys"])
    unknown = ours - set(files)
    if unknown:  # names transformers reported after renaming; map them back
        raise CheckpointError(f"internal: transformers reported keys not in the checkpoint: {sorted(unknown)[:5]}")
    tensors = _read_tensors(files, sorted(ours))
    _load_memory_tensors(model, tensors, path)
    model.eval()

    if load_tokenizer and any((path / f).exists() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        model.tokenizer = AutoTokenizer.from_pretrained(path)
    return model


def _load_memory_tensors(model: MemoryModel, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Put every non-base tensor where it belongs; fail on any left over or any parameter left unset."""
    own = dict(model.named_parameters())
    own.update(dict(model.named_buffers()))
    required = {n for n in own if not n.startswith("lm.")} | {
        n for n in own if n.startswith("lm.") and (".lora_" in n or "_proj.0." in n or "_proj.2." in n)
    }
    required.discard("initial_pool")
    set_names: set[str] = set()
    ltm: dict[str, torch.Tensor] = {}
    leftover = []
    for key, t in tensors.items():
        if key == "memory":
            target = "initial_pool"
        elif key == "initialized":
            model.initialized = bool(t.item())
            continue
        elif key.startswith(_LTM_PREFIXES):
            ltm[key] = t
            continue
        elif key in own:
            target = key
        elif "lm." + key in own:
            target = "lm." + key
        else:
            leftover.append(key)
            continue
        dest = own[target]
        if tuple(dest.shape) != tuple(t.shape):
            raise CheckpointError(f"{key} has shape {tuple(t.shape)}, the model expects {tuple(dest.shape)}")
        with torch.no_grad():
            dest.copy_(t.to(dtype=dest.dtype))
        set_names.add(target)
    if leftover:
        hint = " (LoRA keys but no lora_config in config.json?)" if any(".lora_" in k for k in leftover) else ""
        raise CheckpointError(f"checkpoint {path} has keys memllm does not know{hint}: {sorted(leftover)[:8]}")
    if "initial_pool" not in set_names:
        raise CheckpointError(f"checkpoint {path} has no `memory` tensor: not a memory model checkpoint")
    missing = required - set_names
    if missing:
        raise CheckpointError(f"checkpoint {path} does not set these parameters: {sorted(missing)[:8]}")
    if model.config.kind == "mplus":
        if not ltm:
            raise CheckpointError(f"M+ checkpoint {path} has no long-term memory (ltm.* tensors)")
        # Stored keys are kept as they are (they are not recomputed from the vectors).
        model.initial_ltm = LongTermMemory.from_tensors(ltm, ltm_config(model))
    elif ltm:
        raise CheckpointError(f"checkpoint {path} has long-term memory tensors but is not an M+ model")


def state_dict_for_save(model: MemoryModel) -> dict[str, torch.Tensor]:
    """The authors' key layout: Llama keys (peft-wrapped where LoRA), memory, bos, positional vector."""
    out = {k.removeprefix("lm."): v for k, v in model.state_dict().items() if k.startswith("lm.")}
    out["bos_embedding"] = model.bos_embedding.data
    out["new_memory_positional_emb"] = model.new_memory_positional_emb.data
    out["memory"] = model.initial_pool
    if model.config.kind == "mplus":
        if model.initial_ltm is not None:
            out.update({k: v for k, v in model.initial_ltm.state_dict().items() if k.startswith(_LTM_PREFIXES)})
    else:
        out["initialized"] = torch.tensor(int(model.initialized), dtype=torch.uint8)
    return out


def save(model: MemoryModel, out_dir: str | os.PathLike, max_shard_size: str = "5GB") -> Path:
    """Write config.json, safetensors (sharded when large) and the tokenizer, loadable by `load`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = model.lm.config.to_dict()
    for k in ("architectures", "auto_map", "transformers_version"):
        config.pop(k, None)
    config.update(model.config.to_hf_dict())
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if model.lm.generation_config is not None:
        model.lm.generation_config.save_pretrained(out)
    state = {k: v.detach().to("cpu").contiguous() for k, v in state_dict_for_save(model).items()}
    split = split_torch_state_dict_into_shards(state, max_shard_size=max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        save_file({n: state[n] for n in names}, out / filename, metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {}, "weight_map": split.tensor_to_filename}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(out)
    return out


def init_from_base(
    base: str | os.PathLike,
    num_tokens: int = 256,
    num_blocks: int = 50,
    kind: str = "memoryllm",
    num_ltm_blocks: int = 0,
    lora: LoraSettings | None = None,
    add_decoder_lora: bool = False,
    dtype: torch.dtype | None = None,
    seed: int = 0,
) -> MemoryModel:
    """Turn a Llama-family causal LM into an (untrained) memory model.

    The pool starts *uninitialised*, as in the authors' code: the first injection fills it by
    repeating its delta memory. bos and positional vectors start small and random.
    """
    path = resolve(base)
    raw, hf_config = read_hf_config(path)
    lm = AutoModelForCausalLM.from_pretrained(path, config=hf_config, dtype=dtype or torch.float32)
    config = MemoryConfig(
        kind=kind, num_tokens=num_tokens, num_blocks=num_blocks, num_ltm_blocks=num_ltm_blocks,
        lora_config=lora, add_decoder_lora=add_decoder_lora and lora is not None,
        add_selector=kind == "mplus", add_encoder_retriever=kind == "mplus",
    )
    model = MemoryModel(lm, config)
    initialize_memory_parameters(model, seed)
    if (path / "tokenizer_config.json").exists() or (path / "tokenizer.json").exists():
        model.tokenizer = AutoTokenizer.from_pretrained(path)
    return model


def initialize_memory_parameters(model: MemoryModel, seed: int = 0) -> None:
    """Small random bos / positional vectors and pool, marked uninitialised (first inject fills it);
    M+: an empty long-term memory."""
    g = torch.Generator().manual_seed(seed)
    std = getattr(model.lm.config, "initializer_range", 0.02)
    with torch.no_grad():
        for p in (model.bos_embedding, model.new_memory_positional_emb, model.initial_pool):
            p.copy_(torch.randn(p.shape, generator=g) * std)
    model.initialized = False
    if model.config.kind == "mplus":
        model.initial_ltm = empty_ltm(model)
