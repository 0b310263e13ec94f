"""A memory model: a stock transformers causal LM plus the parameters that let it read and write memory.

The base model is transformers' own implementation (any Llama-family checkpoint). What MemoryLLM adds:

- `bos_embedding` [L, 1, d]: a learned vector in front of the memory at every layer;
- `new_memory_positional_emb` [1, 1, d]: added at every layer to the rows that become new memory;
- LoRA adapters through peft: `default` while injecting, `decoder_adapter` while generating;
- M+: per-layer retriever projectors `query_proj`, `key_proj`, `encoder_query_proj`, attached to each
  layer's `self_attn` so their names match the published checkpoints.

Memory enters layer l as a key/value prefix (SPEC §2): the prefix rows go through that layer's
input_layernorm, k_proj and v_proj and are rotated at positions 0..P-1; text tokens follow at P, P+1...
For a memory that does not change, that prefix is a ready key/value cache: `memory_cache` computes it
once per memory state and every question reuses it.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections import OrderedDict
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import rotate_half

from memllm.config import MemoryConfig
from memllm.generate import ask, generate, stream
from memllm.inject import MIN_CONTEXT_TOKENS, DropPolicy, chunks, delta_memory, update
from memllm.memory import Memory, MemoryMismatchError
from memllm.mplus import RowLTM, ltm_is_empty, retrieving, retrieving_rows

ENCODER_ADAPTER = "default"
DECODER_ADAPTER = "decoder_adapter"


def prefilled_cache(config, kv: list[tuple[torch.Tensor, torch.Tensor]], batch: int) -> DynamicCache:
    """A transformers cache holding a prefix's (k, v) per layer, broadcast to `batch` rows without a
    copy (the first update concatenates, so the given tensors are never written into)."""
    cache = DynamicCache(config=config)
    for layer, (k, v) in zip(cache.layers, kv):
        layer.lazy_initialization(k, v)
        layer.keys, layer.values = k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)
    return cache


class Projector(nn.Sequential):
    """M+ retriever projector: Linear(d -> 2s) -> activation -> Linear(2s -> s), no biases."""

    def __init__(self, hidden_size: int, selector_dim: int, act: nn.Module) -> None:
        super().__init__(
            nn.Linear(hidden_size, 2 * selector_dim, bias=False),
            act,
            nn.Linear(2 * selector_dim, selector_dim, bias=False),
        )


class MemoryModel(nn.Module):
    """Base LM + memory parameters. Memories are separate `Memory` objects passed to every call."""

    def __init__(self, lm: PreTrainedModel, config: MemoryConfig, tokenizer=None) -> None:
        super().__init__()
        self.lm = lm
        self.config = config
        self.tokenizer = tokenizer
        c = lm.config
        L, d = c.num_hidden_layers, c.hidden_size
        dtype = lm.get_input_embeddings().weight.dtype
        device = lm.get_input_embeddings().weight.device
        self.bos_embedding = nn.Parameter(torch.zeros(L, 1, d, dtype=dtype, device=device))
        self.new_memory_positional_emb = nn.Parameter(torch.zeros(1, 1, d, dtype=dtype, device=device))
        # The trained initial pool shipped with a checkpoint: resetting it to zeros destroys the model.
        self.register_buffer("initial_pool", torch.zeros(L, config.num_memory_tokens, d, dtype=dtype, device=device))
        self.initialized = True
        if config.lora_config is not None:
            self._add_lora()
        if config.kind == "mplus":
            from transformers.activations import ACT2FN

            for layer in self.layers:
                layer_device = layer.input_layernorm.weight.device
                names = ["query_proj", "key_proj"] + (["encoder_query_proj"] if config.add_encoder_retriever else [])
                for name in names:
                    proj = Projector(d, config.selector_hidden_dim, ACT2FN[c.hidden_act])
                    layer.self_attn.add_module(name, proj.to(device=layer_device, dtype=dtype))
        self._prefix_cache: OrderedDict[tuple, tuple[torch.Tensor, ...]] = OrderedDict()
        self.retrieval_mode = "exact"  # M+: "exact" (the published dense scan) or "index" (faiss)

    # ---- structure -----------------------------------------------------------------------------

    @property
    def layers(self) -> nn.ModuleList:
        return self.lm.model.layers

    @property
    def num_layers(self) -> int:
        return self.lm.config.num_hidden_layers

    @property
    def hidden_size(self) -> int:
        return self.lm.config.hidden_size

    @property
    def dtype(self) -> torch.dtype:
        return self.bos_embedding.dtype

    @property
    def device(self) -> torch.device:
        return self.lm.get_input_embeddings().weight.device

    def _add_lora(self) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        s = self.config.lora_config
        lora = LoraConfig(
            r=s.r, lora_alpha=s.lora_alpha, lora_dropout=s.lora_dropout, target_modules=list(s.target_modules)
        )
        inject_adapter_in_model(lora, self.lm, adapter_name=ENCODER_ADAPTER)
        if self.config.add_decoder_lora:
            with warnings.catch_warnings():  # a second adapter on the same model is what we want
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                inject_adapter_in_model(lora, self.lm, adapter_name=DECODER_ADAPTER)
        self._set_adapter(ENCODER_ADAPTER)  # peft leaves the last injected one active

    @contextmanager
    def adapter(self, role: str) -> Iterator[None]:
        """Activate the injection ("encoder") or generation ("decoder") LoRA adapter for a block.

        peft's layer-level `set_adapter` also flips `requires_grad`; we restore it, since training
        updates both adapters.
        """
        if self.config.lora_config is None:
            yield
            return
        name = DECODER_ADAPTER if role == "decoder" and self.config.add_decoder_lora else ENCODER_ADAPTER
        previous = self._active_adapter
        if name == previous:
            yield
            return
        self._set_adapter(name)
        try:
            yield
        finally:
            self._set_adapter(previous)

    @contextmanager
    def layer_hooks(self, pre: Callable | None = None, post: Callable | None = None) -> Iterator[None]:
        """For a block: a forward pre-hook `pre(l)` and/or hook `post(l)` (hook factories taking the layer
        index, kwargs-style) on every decoder layer. How memllm does per-layer work inside
        transformers' own forward (injection, M+ retrieval, capturing layer inputs in training)."""
        handles = []
        try:
            for l, layer in enumerate(self.layers):
                if pre is not None:
                    handles.append(layer.register_forward_pre_hook(pre(l), with_kwargs=True))
                if post is not None:
                    handles.append(layer.register_forward_hook(post(l), with_kwargs=True))
            yield
        finally:
            for h in handles:
                h.remove()

    def _set_adapter(self, name: str) -> None:
        from peft.tuners.lora import LoraLayer

        grads = {p: p.requires_grad for p in self.lm.parameters()}
        for module in self.lm.modules():
            if isinstance(module, LoraLayer):
                module.set_adapter(name)
        for p, g in grads.items():
            p.requires_grad_(g)
        self._active_adapter = name

    # ---- memories ------------------------------------------------------------------------------

    @property
    def fingerprint(self) -> str:
        """Identifies the latent space a memory lives in: the architecture and the memory parameters.

        Hashed at bfloat16 precision, so loading the same checkpoint in another dtype keeps it.
        Computed again only when those parameters change (every read checks it).
        """
        version = (self.bos_embedding._version, self.new_memory_positional_emb._version,
                   self.bos_embedding.data_ptr(), self.new_memory_positional_emb.data_ptr())
        if getattr(self, "_fingerprint", (None, None))[0] == version:
            return self._fingerprint[1]
        c = self.lm.config
        h = hashlib.sha256()
        shape = [self.config.kind, c.model_type, c.num_hidden_layers, c.hidden_size, c.vocab_size,
                 self.config.num_memory_tokens, self.config.num_tokens]
        h.update(json.dumps(shape).encode())
        for t in (self.bos_embedding, self.new_memory_positional_emb):
            h.update(t.detach().to("cpu", torch.bfloat16).contiguous().view(torch.uint8).numpy().tobytes())
        self._fingerprint = (version, h.hexdigest()[:16])
        return self._fingerprint[1]

    def new_memory(self) -> Memory:
        """A fresh memory: the checkpoint's trained initial pool (and, for M+, its long-term memory)."""
        memory = Memory(pool=self.initial_pool.detach().clone(), fingerprint=self.fingerprint,
                        initialized=self.initialized)
        if self.config.kind == "mplus":
            memory.stm_ages = torch.zeros(self.initial_pool.shape[:2], dtype=torch.long, device=self.device)
            memory.ltm = getattr(self, "initial_ltm", None)
            memory.ltm = memory.ltm.fork() if memory.ltm is not None else None
        return memory

    def check_memory(self, memory: Memory) -> None:
        """Refuse a memory that does not belong to this model, with the reason."""
        expected = (self.num_layers, self.config.num_memory_tokens, self.hidden_size)
        if tuple(memory.pool.shape) != expected:
            raise MemoryMismatchError(
                f"memory pool has shape {tuple(memory.pool.shape)}, this model needs {expected} "
                "(layers, memory vectors per layer, hidden size): it belongs to another model"
            )
        if memory.fingerprint != self.fingerprint:
            raise MemoryMismatchError(
                f"memory fingerprint {memory.fingerprint} does not match this model's {self.fingerprint}: "
                "it was written by another model (or before the model was trained further)"
            )
        if memory.pool.dtype != self.dtype:
            raise MemoryMismatchError(
                f"memory is {memory.pool.dtype}, the model runs in {self.dtype}; "
                f"convert it explicitly with memory.to(dtype={self.dtype})"
            )

    def load_memory(self, path: str, convert_dtype: bool = False, verify: bool = True) -> Memory:
        """Load a memory file and check it belongs to this model (see `Memory.load`)."""
        memory = Memory.load(path, device=self.device, verify=verify)
        if convert_dtype and memory.pool.dtype != self.dtype:
            memory = memory.to(dtype=self.dtype)
        self.check_memory(memory)
        return memory

    # ---- the memory prefix ---------------------------------------------------------------------

    def rope(self, like: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B, P, head_dim] for position ids [B, P], with the model's rope scaling."""
        return self.lm.model.rotary_emb(like, positions)

    def prefix_kv(self, layer_idx: int, rows: torch.Tensor, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of prefix rows [B, P, d] at layer l, rotated at positions start..start+P-1.

        Prefix rows are keys and values only: input_layernorm, k_proj, v_proj, RoPE; no query, no
        residual, no MLP. Returns k, v [B, kv_heads, P, head_dim].
        """
        layer = self.layers[layer_idx]
        attn = layer.self_attn
        B, P, _ = rows.shape
        h = layer.input_layernorm(rows)
        k = attn.k_proj(h).view(B, P, -1, attn.head_dim).transpose(1, 2)
        v = attn.v_proj(h).view(B, P, -1, attn.head_dim).transpose(1, 2)
        positions = torch.arange(start, start + P, device=rows.device).unsqueeze(0)
        cos, sin = self.rope(rows, positions)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return k * cos + rotate_half(k) * sin, v

    def memory_prefix(self, memory: Memory) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int]:
        """Per-layer (k, v) [1, kv_heads, P, head_dim] of the memory prefix, and P.

        MemoryLLM: [bos_l ; memory_l], P = N + 1. M+: [bos_l ; R placeholders ; STM_l], P = 1 + R + N,
        the placeholders being filled by retrieval inside the forward pass (`memllm.mplus`).
        Computed once per memory state when no gradient is needed (the main speed lever: the prefix
        of N vectors per layer would otherwise be projected again for every question).
        """
        if not memory.initialized:
            return [], 0
        R = self.config.num_retrieved
        cacheable = not torch.is_grad_enabled() or not (memory.pool.requires_grad or self.bos_embedding.requires_grad)
        key = (id(memory.pool), memory.pool._version, self._active_adapter_for("decoder"),
               self.bos_embedding._version, self.training)
        if cacheable and key in self._prefix_cache:
            entry = self._prefix_cache[key]
            if entry[0] is memory.pool:
                self._prefix_cache.move_to_end(key)
                return entry[1], entry[2]
        kv = self.pool_prefix(memory.pool.unsqueeze(0))
        P = 1 + R + memory.pool.shape[1]
        if cacheable:
            self._prefix_cache[key] = (memory.pool, kv, P)
            while len(self._prefix_cache) > 4:
                self._prefix_cache.popitem(last=False)
        return kv, P

    def pool_prefix(self, pools: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer (k, v) [B, kv_heads, P, head_dim] of [bos_l ; R placeholders ; pools[:, l]] for
        pools [B, L, N, d] (decoder adapter). Differentiable: training reads memories through it."""
        R = self.config.num_retrieved
        kv = []
        with self.adapter("decoder"):
            for l, layer in enumerate(self.layers):
                pool = pools[:, l].to(layer.input_layernorm.weight.device)  # [B, N, d]
                B, _, d = pool.shape
                bos = self.bos_embedding[l].unsqueeze(0).expand(B, -1, -1)
                kv.append(self.prefix_kv(l, torch.cat([bos, pool.new_zeros(B, R, d), pool], dim=1)))
        return kv

    def _active_adapter_for(self, role: str) -> str | None:
        if self.config.lora_config is None:
            return None
        return DECODER_ADAPTER if role == "decoder" and self.config.add_decoder_lora else ENCODER_ADAPTER

    def clear_prefix_cache(self) -> None:
        self._prefix_cache.clear()

    # ---- reading from memory -------------------------------------------------------------------

    def prepare(
        self, memory: Memory, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> dict:
        """Model inputs for a prompt read against a memory: the prefix cache, the mask over
        [prefix ; prompt] and position ids that start every row's first real token at P.

        Padding (left or right) is handled: padded positions are masked, real tokens keep the
        positions they would have unpadded.
        """
        self.check_memory(memory)
        kv, P = self.memory_prefix(memory)
        mask_retrieved = self.config.kind == "mplus" and ltm_is_empty(memory)  # nothing to retrieve yet
        return self._read_inputs(input_ids, attention_mask, kv, P, mask_retrieved)

    def _read_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                     kv: list[tuple[torch.Tensor, torch.Tensor]], P: int, mask_retrieved: bool) -> dict:
        B, T = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0) + P
        inputs = {"input_ids": input_ids, "position_ids": position_ids}
        if P == 0:
            inputs["attention_mask"] = attention_mask
            return inputs
        inputs["cache"] = prefilled_cache(self.lm.config, kv, B)
        prefix_mask = attention_mask.new_ones(B, P)
        if mask_retrieved:
            prefix_mask[:, 1 : 1 + self.config.num_retrieved] = 0
        inputs["attention_mask"] = torch.cat([prefix_mask, attention_mask], dim=1)
        return inputs

    def forward_pools(self, input_ids: torch.Tensor, pools: torch.Tensor, labels: torch.Tensor | None = None,
                      ltm: RowLTM | None = None, attention_mask: torch.Tensor | None = None):
        """Logits of input_ids [B, T] with row b reading memory pools[b] ([B, L, N, d]): one memory per
        row, differentiable in the pools (training). M+: row b retrieves from ltm row b; without a
        long-term memory (or an empty one) the retrieved slots are masked, as at inference."""
        P = 1 + self.config.num_retrieved + pools.shape[2]
        read_ltm = ltm is not None and ltm.size > 0 and self.config.num_retrieved > 0
        with self.adapter("decoder"):
            inputs = self._read_inputs(input_ids, attention_mask, self.pool_prefix(pools), P,
                                       self.config.num_retrieved > 0 and not read_ltm)
            if not read_ltm:
                return self.lm(**inputs, labels=labels, use_cache=True)
            text_mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
            with retrieving_rows(self, ltm, inputs["cache"], text_mask):
                return self.lm(**inputs, labels=labels, use_cache=True)

    @contextmanager
    def reading(self, memory: Memory, inputs: dict, trace: list | None = None) -> Iterator[None]:
        """Around a forward/generate on `prepare`d inputs: M+ retrieval hooks (no-op for MemoryLLM)."""
        if self.config.kind != "mplus" or "cache" not in inputs or ltm_is_empty(memory):
            yield
            return
        text_mask = inputs["attention_mask"][:, -inputs["input_ids"].shape[1]:]
        with retrieving(self, memory, inputs["cache"], text_mask, trace, self.retrieval_mode):
            yield

    def forward(
        self,
        input_ids: torch.Tensor,
        memory: Memory,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        retrievals: list | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits of a prompt [B, T] read against a memory (decoder adapter).

        retrievals: M+ only, a list that receives (layer, [Retrieval per row]) for inspection.
        """
        with self.adapter("decoder"):
            inputs = self.prepare(memory, input_ids, attention_mask)
            with self.reading(memory, inputs, retrievals):
                return self.lm(**inputs, labels=labels, use_cache="cache" in inputs, **kwargs)

    # ---- the small public API: inject, generate, ask, stream ------------------------------------

    def inject(
        self,
        memory: Memory,
        context: "str | torch.Tensor | list[int]",
        chunk_size: int | None = None,
        drop: "DropPolicy | None" = None,
        progress: "Callable[[int, int], None] | None" = None,
    ) -> int:
        """Write a context (text or token ids) into a memory, updating it in place.

        A context longer than `chunk_size` tokens (default 2K, the papers' 512 for K = 256) is
        injected chunk by chunk, one update per chunk. Returns the number of updates made.
        `progress(done, total)` is called after each chunk.
        """
        self.check_memory(memory)
        ids = self.encode_context(context)
        chunk_size = chunk_size or self.default_chunk_size
        pieces = chunks(ids, chunk_size)
        for i, piece in enumerate(pieces):
            delta = delta_memory(self, memory.pool, piece.unsqueeze(0), initialized=memory.initialized)
            update(self, memory, delta[0], drop)
            if progress is not None:
                progress(i + 1, len(pieces))
        return len(pieces)

    @property
    def default_chunk_size(self) -> int:
        """Longest context injected at once: 2K tokens, within the model's positions after the prefix."""
        room = getattr(self.lm.config, "max_position_embeddings", 1 << 30) - self.config.num_tokens - 1
        return max(1, min(2 * self.config.num_tokens, room))

    def encode_context(self, context: "str | torch.Tensor | list[int]") -> torch.Tensor:
        """Token ids [T] of a context, validated: not empty, ids in range; warns under 16 tokens."""
        if isinstance(context, str):
            if not context.strip():
                raise ValueError("nothing to inject: the text is empty")
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: inject token ids instead of text")
            ids = self.tokenizer(context, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
        else:
            ids = torch.as_tensor(context, dtype=torch.long)
            if ids.dim() == 2 and ids.shape[0] == 1:
                ids = ids[0]
            if ids.dim() != 1:
                raise ValueError(f"inject one context at a time: token ids must be [T], got {tuple(ids.shape)}")
        if ids.numel() == 0:
            raise ValueError("nothing to inject: the context has no tokens")
        vocab = self.lm.get_input_embeddings().weight.shape[0]
        bad = ids[(ids < 0) | (ids >= vocab)]
        if bad.numel():
            raise ValueError(f"invalid token ids {bad[:5].tolist()}: the vocabulary has {vocab} tokens")
        if ids.numel() < MIN_CONTEXT_TOKENS:
            warnings.warn(
                f"context of {ids.numel()} tokens: the published models were trained on contexts of at least "
                f"{MIN_CONTEXT_TOKENS} tokens; shorter ones are written less reliably",
                stacklevel=2,
            )
        return ids.to(self.device)

    def generate(self, memory: Memory, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kw):
        """transformers' `generate` read against a memory; see `memllm.generate.generate`."""
        return generate(self, memory, input_ids, attention_mask, **kw)

    def ask(self, memory: Memory, question: "str | list[str]", max_new_tokens: int = 32, **kw) -> "str | list[str]":
        """Answer a question (or a batch) from memory."""
        return ask(self, memory, question, max_new_tokens=max_new_tokens, **kw)

    def stream(self, memory: Memory, question: str, max_new_tokens: int = 128, **kw) -> Iterator[str]:
        """Stream the answer to a question as it is generated."""
        return stream(self, memory, question, max_new_tokens=max_new_tokens, **kw)
