"""Every use memllm makes of transformers' internals, in one place.

memllm runs transformers' own causal LMs and reaches inside them in a few ways: it walks the decoder
layers and their sub-modules, projects memory rows through a layer's own norm and key/value
projections and rotary embedding, hands the model a key/value cache it filled itself, reads or
replaces the hidden states entering a decoder layer from forward hooks, and registers one attention
function (`sdpa_grouped`) with transformers' attention interface. Each of those is one small
function here, whose docstring names the transformers behaviour it relies on; tests/test_hf_compat.py
checks every one against transformers itself, for every supported model type, so that an upgrade that
changes any of them fails a named test instead of silently changing what a memory model computes.

Supported base models (`SUPPORTED_MODEL_TYPES`): the Llama family, whose decoder layers share the
Llama layout: `model.layers[l]` with `input_layernorm`, `self_attn.{q,k,v,o}_proj` (GQA, head_dim),
`post_attention_layernorm`, `mlp`, and RoPE computed once in `model.rotary_emb` and applied with
`rotate_half`:

- `llama` (and the authors' `memoryllm` / `mplus` config names, which are Llama underneath);
- `mistral` (its cache layers are sliding-window ones; `prefilled_cache` and `static_prefilled_cache`
  account for that);
- `qwen2` (biased q/k/v projections; same layout).

The LoRA target names (`memllm.core.config.LoraSettings.target_modules`: q_proj, k_proj, v_proj,
gate_proj, up_proj, down_proj) are these models' module names too; tests/test_hf_compat.py checks them.

transformers versions: as pinned in pyproject.toml (`transformers>=5.20,<6`): the `cache` keyword
(formerly `past_key_values`, an alias until 5.40), `DynamicCache(config=...)` with per-layer
`DynamicLayer`s, `StaticCache(config=..., max_cache_len=...)` with per-layer `StaticLayer`s, and
decoder layers that return a tensor all date from the 5.x line.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from transformers import AttentionInterface, Cache, DynamicCache, PretrainedConfig, PreTrainedModel, StaticCache
from transformers.cache_utils import StaticLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.models.llama.modeling_llama import rotate_half

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")

# The keyword under which transformers' model forward, decoder layers and `generate` take a Cache.
CACHE_ARG = "cache"


# ---- structure --------------------------------------------------------------------------------------


def decoder(lm: PreTrainedModel) -> nn.Module:
    """The decoder stack without the LM head: `lm.model` in every supported *ForCausalLM."""
    return lm.model


def decoder_layers(lm: PreTrainedModel) -> nn.ModuleList:
    """The decoder layers, in order: `lm.model.layers`. memllm hooks each one (`MemoryModel.layer_hooks`)."""
    return decoder(lm).layers


def attention(layer: nn.Module) -> nn.Module:
    """A decoder layer's attention module, `layer.self_attn`: it holds k_proj, v_proj and head_dim, and
    M+'s retriever projectors are attached to it (so their names match the published checkpoints)."""
    return layer.self_attn


def input_norm(layer: nn.Module) -> nn.Module:
    """The norm a decoder layer applies to its input before attention, `layer.input_layernorm`."""
    return layer.input_layernorm


def layer_device(layer: nn.Module) -> torch.device:
    """Where a decoder layer's weights are (a model may be spread over devices by `device_map`)."""
    return input_norm(layer).weight.device


# ---- keys, values and positions ---------------------------------------------------------------------


def rotary(lm: PreTrainedModel, like: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, P, head_dim] at position ids [B, P], with the model's rope scaling: the model's own
    `model.rotary_emb(x, position_ids)`, which it computes once per forward for all layers."""
    return decoder(lm).rotary_emb(like, positions)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE as the attention applies it to keys: x [B, heads, P, head_dim], cos/sin [B, P, head_dim];
    `x * cos + rotate_half(x) * sin` (the half-split rotation of transformers' Llama-family models)."""
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


def project_kv(layer: nn.Module, normed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values, not rotated, [B, kv_heads, P, head_dim], of normed rows [B, P, d]: the layer's
    `self_attn.k_proj` / `v_proj` split into `self_attn.head_dim`-sized heads, heads before positions."""
    attn = attention(layer)
    B, P, _ = normed.shape
    k = attn.k_proj(normed).view(B, P, -1, attn.head_dim).transpose(1, 2)
    v = attn.v_proj(normed).view(B, P, -1, attn.head_dim).transpose(1, 2)
    return k, v


def project_q(layer: nn.Module, normed: torch.Tensor) -> torch.Tensor:
    """Queries, not rotated, [B, heads, S, head_dim], of normed rows [B, S, d] (`self_attn.q_proj`)."""
    attn = attention(layer)
    B, S, _ = normed.shape
    return attn.q_proj(normed).view(B, S, -1, attn.head_dim).transpose(1, 2)


def attention_scaling(layer: nn.Module) -> float:
    """The factor of q . k in the layer's attention (1 / sqrt(head_dim) for the Llama family)."""
    return attention(layer).scaling


# ---- the key/value cache ----------------------------------------------------------------------------


def prefilled_cache(config: PretrainedConfig, kv: list[tuple[torch.Tensor, torch.Tensor]], batch: int) -> DynamicCache:
    """A transformers cache holding a prefix's (k, v) [1 or batch, kv_heads, P, head_dim] per layer,
    broadcast to `batch` rows without a copy: for one forward (training, injection), where the
    prefix is read once and the cache may carry gradients back to it.

    Relies on `DynamicCache(config=...)` making one layer per decoder layer, on `DynamicLayer`
    keeping its state in `.keys` / `.values` after `lazy_initialization`, and on its `update`
    concatenating (so the given tensors are never written into). Sliding-window layers (mistral)
    count the tokens they have seen in `cumulative_length`, which sizes their attention masks; the
    prefix must be shorter than their window (their `update` keeps only the window's last tokens)."""
    cache = DynamicCache(config=config)
    for layer, (k, v) in zip(cache.layers, kv):
        layer.lazy_initialization(k, v)
        layer.keys, layer.values = k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)
        if hasattr(layer, "cumulative_length"):
            layer.cumulative_length = k.shape[-2]
    return cache


def static_prefilled_cache(config: PretrainedConfig, kv: list[tuple[torch.Tensor, torch.Tensor]], batch: int,
                           max_len: int) -> StaticCache:
    """A preallocated cache with room for `max_len` positions, holding a prefix's (k, v)
    [1 or batch, kv_heads, P, head_dim] per layer in its first P, for generation (no gradients).

    Why: a `DynamicCache` concatenates every new token onto the whole ~N-row memory prefix, copying
    it at every step of every layer (most of decoding time); a static one writes one row in place.
    Relies on `StaticCache(config=..., max_cache_len=...)` making one `StaticLayer` per decoder layer
    (`StaticSlidingWindowLayer` for mistral's sliding-window layers), whose `lazy_initialization`
    allocates `.keys` / `.values` [batch, kv_heads, max_cache_len, head_dim] and whose `update`
    writes at the tensor `cumulative_length` (and, sliding, the int `cumulative_length_int`). The
    prefix must be shorter than a sliding window (as for `prefilled_cache`)."""
    cache = StaticCache(config=config, max_cache_len=max_len)
    for layer, (k, v) in zip(cache.layers, kv):
        P = k.shape[-2]
        if P >= layer.max_cache_len:
            raise ValueError(f"a prefix of {P} positions does not fit a cache layer of {layer.max_cache_len}")
        layer.lazy_initialization(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1))
        layer.keys[:, :, :P].copy_(k)  # broadcast over the batch
        layer.values[:, :, :P].copy_(v)
        layer.cumulative_length.fill_(P)
        if hasattr(layer, "cumulative_length_int"):
            layer.cumulative_length_int = P
    return cache


def layer_kv(cache: Cache, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and values [B, kv_heads, S, head_dim] a cache holds for one layer (`cache.layers[l]`):
    `.keys` / `.values`, or a static layer's filled first S positions, S its `get_seq_length` (views
    into its buffers)."""
    layer = cache.layers[layer_idx]
    if isinstance(layer, StaticLayer):
        S = _static_length(layer)
        return layer.keys[:, :, :S], layer.values[:, :, :S]
    return layer.keys, layer.values


def _static_length(layer: StaticLayer) -> int:
    """A static layer's filled positions: `get_seq_length` (a tensor, or an int when sliding), at most
    its buffer's."""
    return min(int(layer.get_seq_length()), layer.max_cache_len)


def write_layer_rows(cache: Cache, layer_idx: int, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Replace positions start .. start + n of one layer's cached keys and values [B, kv_heads, n,
    head_dim] (M+ writes retrieved rows over the placeholders of a prefilled cache before the layer
    reads it). A static layer's buffers are written in place (they keep their address); a dynamic
    layer gets new tensors, since its `.keys` / `.values` may be views of a prefix shared with other
    reads."""
    layer = cache.layers[layer_idx]
    n = keys.shape[-2]
    if isinstance(layer, StaticLayer):
        if start + n > _static_length(layer):
            raise ValueError(f"positions {start}..{start + n} given for a static cache layer holding "
                             f"{_static_length(layer)}")
        layer.keys[:, :, start:start + n].copy_(keys)
        layer.values[:, :, start:start + n].copy_(values)
        return
    B = keys.shape[0]
    old_k, old_v = (t.expand(B, -1, -1, -1) for t in (layer.keys, layer.values))
    layer.keys = torch.cat([old_k[:, :, :start], keys, old_k[:, :, start + n:]], dim=2)
    layer.values = torch.cat([old_v[:, :, :start], values, old_v[:, :, start + n:]], dim=2)


# ---- decoder-layer hooks ----------------------------------------------------------------------------


def layer_hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states [B, T, d] entering a decoder layer, from a forward pre-hook registered
    `with_kwargs=True`: the model passes them positionally; `hidden_states` by keyword otherwise."""
    return args[0] if args else kwargs["hidden_states"]


def with_layer_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    """A pre-hook's return value that makes the layer run on `hidden` instead (see `layer_hidden`)."""
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def layer_output(output: torch.Tensor | tuple) -> torch.Tensor:
    """The hidden states [B, T, d] a decoder layer returns, from a forward hook: a tensor in 5.x
    (a tuple whose first element they are in earlier releases)."""
    return output[0] if isinstance(output, tuple) else output


# ---- attention ------------------------------------------------------------------------------------

# The name under which `sdpa_grouped` is registered with transformers' attention (and mask) interfaces.
SDPA_GROUPED = "memllm_sdpa"


def sdpa_grouped(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                 is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' sdpa attention, except for masked attention of several queries over grouped
    key/value heads on CPU: one SDPA call with `enable_gqa`, where transformers' `sdpa_attention_forward`
    copies every key/value head once per query head (`repeat_kv`; it keeps `enable_gqa` for unmasked
    calls because CUDA's kernels fall back to the math one with a mask). memllm's reads always carry a
    mask over [memory prefix ; prompt], so that copy was of the whole ~2,000-row prefix at every layer
    of every prefill: ~20% of the time to first token on CPU. Same numbers (tests/test_hf_compat.py).
    query [B, heads, T, head_dim]; key, value [B, kv_heads, S, head_dim]; returns [B, T, heads, head_dim].
    """
    if (query.device.type == "cpu" and getattr(module, "num_key_value_groups", 1) > 1 and query.shape[2] > 1
            and attention_mask is not None and kwargs.get("position_bias") is None
            and kwargs.get("softcap") is None):
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                             scale=scaling, enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


# Registered on import, so that a model whose config names it runs in any process that imports memllm
# (a copy unpickled in another process too); a new name, so no other model's attention changes.
AttentionInterface.register(SDPA_GROUPED, sdpa_grouped)
AttentionMaskInterface.register(SDPA_GROUPED, sdpa_mask)


def use_sdpa_grouped(lm: PreTrainedModel) -> None:
    """Run an sdpa model's attention through `sdpa_grouped` (same masks as sdpa). Models set to another
    implementation (eager, flash attention) are left as they are."""
    if lm.config._attn_implementation == "sdpa":
        lm.set_attn_implementation(SDPA_GROUPED)
