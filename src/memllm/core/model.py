"""A memory model: a stock transformers causal LM plus the parameters that let it read and write memory.

The base model is transformers' own implementation (any Llama-family checkpoint). What MemoryLLM adds:

- `bos_embedding` [L, 1, d]: a learned vector in front of the memory at every layer;
- `new_memory_positional_emb` [1, 1, d]: added at every layer to the rows that become new memory;
- LoRA adapters through peft: `default` while injecting, `decoder_adapter` while generating;
- M+: per-layer retriever projectors `query_proj`, `key_proj`, `encoder_query_proj`, attached to each
  layer's `self_attn` so their names match the published checkpoints.

Memory enters layer l as a key/value prefix (SPEC §2): the prefix rows go through that layer's
input_layernorm, k_proj and v_proj and are rotated at positions 0..P-1; text tokens follow at P, P+1...
For a memory that does not change, that prefix is a ready key/value cache: `memory_prefix` computes it
once per memory state and every question reuses it (recently used prefixes are kept up to
`prefix_cache_bytes`).

One model may serve many threads. Per-call work inside transformers' forward (injection, M+ retrieval)
is a plan the calling thread installs (`layer_hooks`), run by hooks registered once on every layer;
the active LoRA adapter is switched only while no call uses the other one (`AdapterGate`); the
tokenizer and the prefix cache are used under locks. The inference calls (`inject`, `generate`, `ask`,
`stream`) build no autograd graph; `forward`, `forward_pools` and `memllm.core.inject.delta_memory` keep
gradients for training.
"""

from __future__ import annotations

import hashlib
import json
import threading
import warnings
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from contextvars import ContextVar
from typing import Callable, Iterator

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import CausalLMOutputWithPast

from memllm.core import attribution, hf_compat
from memllm.core.attribution import Attribution
from memllm.core.config import MemoryConfig
from memllm.core.generate import ask, generate, stream
from memllm.core.inject import MIN_CONTEXT_TOKENS, DropPolicy, carried_rows, chunks, delta_memory, update
from memllm.core.ltm import LongTermMemory
from memllm.core.memory import Memory, MemoryMismatchError
from memllm.core.mplus import RowLTM, empty_ltm, ltm_is_empty, retrieving, retrieving_rows

ENCODER_ADAPTER = "default"
DECODER_ADAPTER = "decoder_adapter"

# The per-layer hooks this thread's calls have installed with `MemoryModel.layer_hooks`, innermost
# last: each plan maps a decoder layer to its (pre-hook, hook). A context variable, so a call's plan
# is seen by its own thread only (and by a thread started in a copy of its context).
_LAYER_PLANS: ContextVar[tuple[dict, ...]] = ContextVar("memllm_layer_plans", default=())


def _run_pre_hooks(module: nn.Module, args: tuple, kwargs: dict):
    """Registered once on every decoder layer: runs the pre-hooks the calling thread planned for it."""
    changed = False
    for plan in _LAYER_PLANS.get():
        hook = plan.get(module, (None, None))[0]
        result = hook(module, args, kwargs) if hook is not None else None
        if result is not None:
            args, kwargs = result
            changed = True
    return (args, kwargs) if changed else None


def _run_post_hooks(module: nn.Module, args: tuple, kwargs: dict, output):
    """Registered once on every decoder layer: runs the hooks the calling thread planned for it."""
    changed = False
    for plan in _LAYER_PLANS.get():
        hook = plan.get(module, (None, None))[1]
        result = hook(module, args, kwargs, output) if hook is not None else None
        if result is not None:
            output, changed = result, True
    return output if changed else None


class AdapterGate:
    """Which LoRA adapter the shared layers run with when threads share a model.

    Calls needing the active adapter run together; a call needing the other one waits until none is
    running, then switches. Arrivals queue behind a waiting switch, so a stream of reads cannot starve
    an injection (and the reverse): they take turns, one chunk of injection at a time. Reentrant per
    thread; a nested block for the other adapter lets go of the outer one meanwhile (the outer block
    is not running). When the last call leaves, the default adapter is active again, as before.
    """

    def __init__(self, switch: Callable[[str], None], default: str, active: str) -> None:
        self._switch, self._default, self._active = switch, default, active
        self._running = 0
        self._waiting: dict[str, int] = {}
        self._cond = threading.Condition()
        self._held = threading.local()  # this thread's stack of adapters in use

    @contextmanager
    def use(self, name: str) -> Iterator[None]:
        held: list[str] = self._held.__dict__.setdefault("stack", [])
        if held and held[-1] == name:  # nested block, same adapter: already ours
            held.append(name)
            try:
                yield
            finally:
                held.pop()
            return
        if held:
            self._leave()
        self._enter(name)
        held.append(name)
        try:
            yield
        finally:
            held.pop()
            self._leave()
            if held:
                self._enter(held[-1])

    def _may_enter(self, name: str) -> bool:
        others_waiting = any(n != name and w for n, w in self._waiting.items())
        return self._running == 0 if name != self._active else not others_waiting

    def _enter(self, name: str) -> None:
        with self._cond:
            self._waiting[name] = self._waiting.get(name, 0) + 1
            try:
                self._cond.wait_for(lambda: self._may_enter(name))
            finally:
                self._waiting[name] -= 1
                self._cond.notify_all()
            if name != self._active:
                self._switch(name)
                self._active = name
            self._running += 1

    def _leave(self) -> None:
        with self._cond:
            self._running -= 1
            if self._running == 0:
                if self._active != self._default and not any(self._waiting.values()):
                    self._switch(self._default)
                    self._active = self._default
                self._cond.notify_all()


class Projector(nn.Sequential):
    """M+ retriever projector: Linear(d -> 2s) -> activation -> Linear(2s -> s), no biases."""

    def __init__(self, hidden_size: int, selector_dim: int, act: nn.Module) -> None:
        super().__init__(
            nn.Linear(hidden_size, 2 * selector_dim, bias=False),
            act,
            nn.Linear(2 * selector_dim, selector_dim, bias=False),
        )


PREFIX_CACHE_BYTES = 1 << 30  # default budget of ready memory prefixes: a few for a 7B model's 7,681-row memory


@dataclass
class _Prefix:
    """A memory state's ready key/value prefix: per layer (k, v) [1, kv_heads, P, head_dim]."""

    pool: torch.Tensor  # the pool it was made from (the cache key holds only its id)
    kv: list[tuple[torch.Tensor, torch.Tensor]]
    length: int  # P
    nbytes: int


class MemoryModel(nn.Module):
    """Base LM + memory parameters. Memories are separate `Memory` objects passed to every call."""

    def __init__(self, lm: PreTrainedModel, config: MemoryConfig, tokenizer=None) -> None:
        super().__init__()
        self.lm = lm
        self.config = config
        self.tokenizer = tokenizer
        c = lm.config
        hf_compat.use_sdpa_grouped(lm)
        L, d = c.num_hidden_layers, c.hidden_size
        dtype = lm.get_input_embeddings().weight.dtype
        device = lm.get_input_embeddings().weight.device
        self.bos_embedding = nn.Parameter(torch.zeros(L, 1, d, dtype=dtype, device=device))
        self.new_memory_positional_emb = nn.Parameter(torch.zeros(1, 1, d, dtype=dtype, device=device))
        # The trained initial pool shipped with a checkpoint: resetting it to zeros destroys the model.
        self.register_buffer("initial_pool", torch.zeros(L, config.num_memory_tokens, d, dtype=dtype, device=device))
        self.initialized = True
        # M+: the long-term memory every new memory starts from (a checkpoint's; empty until loaded).
        self.initial_ltm: LongTermMemory | None = empty_ltm(self) if config.kind == "mplus" else None
        if config.lora_config is not None:
            self._add_lora()
        if config.kind == "mplus":
            for layer in self.layers:
                names = ["query_proj", "key_proj"] + (["encoder_query_proj"] if config.add_encoder_retriever else [])
                for name in names:
                    proj = Projector(d, config.selector_hidden_dim, ACT2FN[c.hidden_act])
                    hf_compat.attention(layer).add_module(
                        name, proj.to(device=hf_compat.layer_device(layer), dtype=dtype))
        for layer in self.layers:
            if not getattr(layer, "_memllm_plans", False):  # once, even if two models wrap one lm
                layer.register_forward_pre_hook(_run_pre_hooks, with_kwargs=True)
                layer.register_forward_hook(_run_post_hooks, with_kwargs=True)
                layer._memllm_plans = True
        self._init_sharing()
        self.retrieval_mode = "exact"  # M+: "exact" (the published dense scan) or "index" (faiss)
        # bytes of memory prefixes kept ready (least recently used out first; the newest is always kept)
        self.prefix_cache_bytes = PREFIX_CACHE_BYTES

    def _init_sharing(self) -> None:
        """What threads sharing the model synchronise on (made again for a copy, see __setstate__)."""
        self._prefix_cache: OrderedDict[tuple, _Prefix] = OrderedDict()
        self._prefix_bytes = 0  # held by the entries of _prefix_cache
        self._prefix_lock = threading.Lock()
        self._tokenizer_lock = threading.Lock()
        active = getattr(self, "_active_adapter", ENCODER_ADAPTER)
        self._adapters = AdapterGate(self._set_adapter, ENCODER_ADAPTER, active)

    def __getstate__(self) -> dict:
        """Copies (deepcopy, pickle) leave out the locks and the prefix cache."""
        state = dict(super().__getstate__())
        for name in ("_prefix_cache", "_prefix_bytes", "_prefix_lock", "_tokenizer_lock", "_adapters"):
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._init_sharing()

    # ---- structure -----------------------------------------------------------------------------

    @property
    def layers(self) -> nn.ModuleList:
        return hf_compat.decoder_layers(self.lm)

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

        Threads needing the same adapter run together; one needing the other waits (`AdapterGate`).
        peft's layer-level `set_adapter` also flips `requires_grad`; we restore it, since training
        updates both adapters.
        """
        if self.config.lora_config is None:
            yield
            return
        with self._adapters.use(self._active_adapter_for(role)):
            yield

    @contextmanager
    def layer_hooks(self, pre: Callable | None = None, post: Callable | None = None) -> Iterator[None]:
        """For a block of the calling thread: a forward pre-hook `pre(l)` and/or hook `post(l)` (hook
        factories taking the layer index, kwargs-style) on every decoder layer. How memllm does
        per-layer work inside transformers' own forward (injection, M+ retrieval, capturing layer
        inputs in training). Other threads' forwards do not see them; nested blocks run in order."""
        plan = {layer: (pre(l) if pre is not None else None, post(l) if post is not None else None)
                for l, layer in enumerate(self.layers)}
        token = _LAYER_PLANS.set(_LAYER_PLANS.get() + (plan,))
        try:
            yield
        finally:
            _LAYER_PLANS.reset(token)

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
            memory.ltm = self.initial_ltm.fork() if self.initial_ltm is not None else None
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
        return hf_compat.rotary(self.lm, like, positions)

    def prefix_kv(self, layer_idx: int, rows: torch.Tensor, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of prefix rows [B, P, d] at layer l, rotated at positions start..start+P-1.

        Prefix rows are keys and values only: input_layernorm, k_proj, v_proj, RoPE; no query, no
        residual, no MLP. Returns k, v [B, kv_heads, P, head_dim].
        """
        layer = self.layers[layer_idx]
        k, v = hf_compat.project_kv(layer, hf_compat.input_norm(layer)(rows))
        positions = torch.arange(start, start + rows.shape[1], device=rows.device).unsqueeze(0)
        cos, sin = self.rope(rows, positions)
        return hf_compat.apply_rotary(k, cos, sin), v

    def memory_prefix(self, memory: Memory) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int]:
        """Per-layer (k, v) [1, kv_heads, P, head_dim] of the memory prefix, and P.

        MemoryLLM: [bos_l ; memory_l], P = N + 1. M+: [bos_l ; R placeholders ; STM_l], P = 1 + R + N,
        the placeholders being filled by retrieval inside the forward pass (`memllm.core.mplus`).
        Computed once per memory state when no gradient is needed (the main speed lever: the prefix
        of N vectors per layer would otherwise be projected again for every question).
        """
        if not memory.initialized:
            return [], 0
        R = self.config.num_retrieved
        cacheable = not torch.is_grad_enabled() or not (memory.pool.requires_grad or self.bos_embedding.requires_grad)
        key = (id(memory.pool), memory.pool._version, self._active_adapter_for("decoder"),
               self.bos_embedding._version, self.training)
        if cacheable:
            with self._prefix_lock:
                entry = self._prefix_cache.get(key)
                if entry is not None and entry.pool is memory.pool:
                    self._prefix_cache.move_to_end(key)
                    return entry.kv, entry.length
        kv = self.pool_prefix(memory.pool.unsqueeze(0))
        P = 1 + R + memory.pool.shape[1]
        if cacheable:
            entry = _Prefix(memory.pool, kv, P, sum(t.numel() * t.element_size() for pair in kv for t in pair))
            with self._prefix_lock:
                replaced = self._prefix_cache.pop(key, None)
                self._prefix_bytes += entry.nbytes - (replaced.nbytes if replaced else 0)
                self._prefix_cache[key] = entry
                while len(self._prefix_cache) > 1 and self._prefix_bytes > self.prefix_cache_bytes:
                    self._prefix_bytes -= self._prefix_cache.popitem(last=False)[1].nbytes
        return kv, P

    def prefix_length(self, memory: Memory) -> int:
        """P, the positions a memory's prefix takes before the text (0 for an uninitialised memory)."""
        return 1 + self.config.num_retrieved + memory.pool.shape[1] if memory.initialized else 0

    def check_room(self, memory: Memory, prompt_tokens: int, max_new_tokens: int | None = None,
                   what: str = "prompt") -> None:
        """Refuse a read that does not fit the model's positions (text starts after the memory prefix):
        beyond them RoPE models read garbage, and a huge max_new_tokens would run until killed."""
        limit = getattr(self.lm.config, "max_position_embeddings", None)
        if limit is None:
            return
        prefix = self.prefix_length(memory)
        room = limit - prefix
        if prompt_tokens > room:
            raise ValueError(f"{what} of {prompt_tokens} tokens is too long: the model has {limit} positions and "
                             f"the memory prefix takes {prefix}, leaving {room} for the {what} and the answer")
        if max_new_tokens is not None and prompt_tokens + max_new_tokens > room:
            raise ValueError(f"max_new_tokens={max_new_tokens} is beyond the model's positions: of its {limit}, the "
                             f"memory prefix takes {prefix} and the {what} {prompt_tokens}, so at most "
                             f"{room - prompt_tokens} new tokens")

    def check_token_ids(self, ids: torch.Tensor) -> None:
        """Refuse token ids that an embedding lookup would silently truncate (floats) or fail on
        obscurely (out of range)."""
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise ValueError(f"token ids must be integers, got {ids.dtype}")
        vocab = self.lm.get_input_embeddings().weight.shape[0]
        bad = ids[(ids < 0) | (ids >= vocab)]
        if bad.numel():
            raise ValueError(f"invalid token ids {bad[:5].tolist()}: outside the vocabulary of {vocab} tokens "
                             f"(0..{vocab - 1})")

    def pool_prefix(self, pools: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer (k, v) [B, kv_heads, P, head_dim] of [bos_l ; R placeholders ; pools[:, l]] for
        pools [B, L, N, d] (decoder adapter). Differentiable: training reads memories through it."""
        R = self.config.num_retrieved
        kv = []
        with self.adapter("decoder"):
            for l, layer in enumerate(self.layers):
                pool = pools[:, l].to(hf_compat.layer_device(layer))  # [B, N, d]
                B, _, d = pool.shape
                bos = self.bos_embedding[l].unsqueeze(0).expand(B, -1, -1)
                kv.append(self.prefix_kv(l, torch.cat([bos, pool.new_zeros(B, R, d), pool], dim=1)))
        return kv

    def _active_adapter_for(self, role: str) -> str | None:
        if self.config.lora_config is None:
            return None
        return DECODER_ADAPTER if role == "decoder" and self.config.add_decoder_lora else ENCODER_ADAPTER

    def clear_prefix_cache(self) -> None:
        with self._prefix_lock:
            self._prefix_cache.clear()
            self._prefix_bytes = 0

    def prefix_cache_info(self) -> dict[str, int]:
        """Memory prefixes held ready, and their bytes (bounded by `prefix_cache_bytes`)."""
        with self._prefix_lock:
            return {"entries": len(self._prefix_cache), "bytes": self._prefix_bytes}

    # ---- reading from memory -------------------------------------------------------------------

    def prepare(
        self, memory: Memory, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
        new_tokens: int | None = None,
    ) -> dict:
        """Model inputs for a prompt read against a memory: the prefix cache, the mask over
        [prefix ; prompt] and position ids that start every row's first real token at P.

        Padding (left or right) is handled: padded positions are masked, real tokens keep the
        positions they would have unpadded. Refuses ids that are not token ids and prompts longer
        than the model's positions leave after the prefix. `new_tokens`: generation will add that
        many tokens, so the cache is a preallocated one with room for them (no gradients).
        """
        self.check_memory(memory)
        self.check_token_ids(input_ids)
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}")
        self.check_room(memory, input_ids.shape[1])
        kv, P = self.memory_prefix(memory)
        mask_retrieved = self.config.kind == "mplus" and ltm_is_empty(memory)  # nothing to retrieve yet
        return self._read_inputs(input_ids, attention_mask, kv, P, mask_retrieved, new_tokens)

    def _read_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                     kv: list[tuple[torch.Tensor, torch.Tensor]], P: int, mask_retrieved: bool,
                     new_tokens: int | None = None) -> dict:
        """The inputs `prepare` describes, from a computed prefix kv (P positions). A static cache
        (room for P + T + new_tokens) when decoding steps follow, without gradients: it saves each
        step's copy of the whole cache; a single forward (new_tokens <= 1) reads a dynamic one."""
        B, T = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0) + P
        inputs = {"input_ids": input_ids, "position_ids": position_ids}
        if P == 0:
            inputs["attention_mask"] = attention_mask
            return inputs
        if new_tokens is not None and new_tokens > 1 and not torch.is_grad_enabled():
            inputs[hf_compat.CACHE_ARG] = hf_compat.static_prefilled_cache(self.lm.config, kv, B, P + T + new_tokens)
        else:
            inputs[hf_compat.CACHE_ARG] = hf_compat.prefilled_cache(self.lm.config, kv, B)
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
            with retrieving_rows(self, ltm, inputs[hf_compat.CACHE_ARG], text_mask):
                return self.lm(**inputs, labels=labels, use_cache=True)

    @contextmanager
    def reading(self, memory: Memory, inputs: dict, trace: list | None = None) -> Iterator[None]:
        """Around a forward/generate on `prepare`d inputs: M+ retrieval hooks (no-op for MemoryLLM)."""
        if self.config.kind != "mplus" or hf_compat.CACHE_ARG not in inputs or ltm_is_empty(memory):
            yield
            return
        text_mask = inputs["attention_mask"][:, -inputs["input_ids"].shape[1]:]
        with retrieving(self, memory, inputs[hf_compat.CACHE_ARG], text_mask, trace, self.retrieval_mode):
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
                return self.lm(**inputs, labels=labels, use_cache=hf_compat.CACHE_ARG in inputs, **kwargs)

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

        A context longer than `chunk_size` tokens (default 2K, the papers' 512 for K = 256; at most
        `max_chunk_size`) is injected chunk by chunk, one update per chunk. Returns the number of
        updates made. `progress(done, total)` is called after each chunk.

        Inference: no autograd graph is built (no_grad, not inference_mode, so that the pool stays an
        ordinary tensor a training step may read). Training injects through `delta_memory`.
        """
        self.check_memory(memory)
        if chunk_size is None:
            chunk_size = self.default_chunk_size
        elif chunk_size < 1:
            raise ValueError(f"chunk_size={chunk_size}: must be at least 1 token")
        elif chunk_size > self.max_chunk_size:
            raise ValueError(f"chunk_size={chunk_size} is beyond the model's positions: at most "
                             f"{self.max_chunk_size} tokens are injected at once")
        ids = self.encode_context(context)
        pieces = chunks(ids, chunk_size)
        with torch.no_grad():
            for i, piece in enumerate(pieces):
                delta = delta_memory(self, memory.pool, piece.unsqueeze(0), initialized=memory.initialized)
                carried = carried_rows(self.config.num_tokens, piece.numel(), memory.initialized)
                update(self, memory, delta[0], drop, carried)
                if progress is not None:
                    progress(i + 1, len(pieces))
        return len(pieces)

    @property
    def max_chunk_size(self) -> int:
        """Longest context one injection takes: the model's positions after the prefix (bos + K rows)."""
        return max(1, getattr(self.lm.config, "max_position_embeddings", 1 << 30) - self.config.num_tokens - 1)

    @property
    def default_chunk_size(self) -> int:
        """Longest context injected at once by default: 2K tokens, within `max_chunk_size`."""
        return min(2 * self.config.num_tokens, self.max_chunk_size)

    @contextmanager
    def using_tokenizer(self) -> Iterator:
        """The tokenizer, one thread at a time: a fast tokenizer keeps its padding settings in its
        shared backend, so a call setting them under another thread's encoding unpads its batch."""
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: pass token ids, or load a checkpoint that ships one")
        with self._tokenizer_lock:
            yield self.tokenizer

    def encode_context(self, context: "str | torch.Tensor | list[int]") -> torch.Tensor:
        """Token ids [T] of a context, validated: not empty, integer ids in range; warns under 16 tokens."""
        if isinstance(context, str):
            if not context.strip():
                raise ValueError("nothing to inject: the text is empty")
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: inject token ids instead of text")
            with self.using_tokenizer() as tok:
                ids = tok(context, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
        else:
            ids = torch.as_tensor(context)
            if ids.dim() == 2 and ids.shape[0] == 1:
                ids = ids[0]
            if ids.dim() != 1:
                raise ValueError(f"inject one context at a time: token ids must be [T], got {tuple(ids.shape)}")
        if ids.numel() == 0:
            raise ValueError("nothing to inject: the context has no tokens")
        self.check_token_ids(ids)
        ids = ids.long()
        if ids.numel() < MIN_CONTEXT_TOKENS:
            warnings.warn(
                f"context of {ids.numel()} tokens: the published models were trained on contexts of at least "
                f"{MIN_CONTEXT_TOKENS} tokens; shorter ones are written less reliably",
                stacklevel=2,
            )
        return ids.to(self.device)

    def generate(self, memory: Memory, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kw):
        """transformers' `generate` read against a memory; see `memllm.core.generate.generate`."""
        return generate(self, memory, input_ids, attention_mask, **kw)

    def ask(self, memory: Memory, question: "str | list[str]", max_new_tokens: int = 32, explain: bool = False,
            **kw) -> "str | list[str] | Attribution":
        """Answer a question (or a batch) from memory. With `explain` (one question): the answer and the
        updates whose memory rows it attended to (`memllm.core.attribution.Attribution`)."""
        if explain:
            if not isinstance(question, str):
                raise ValueError("explain=True answers one question at a time: give a str, not a list")
            return attribution.explain(self, memory, question, max_new_tokens=max_new_tokens, **kw)
        return ask(self, memory, question, max_new_tokens=max_new_tokens, **kw)

    def forget(self, memory: Memory, update_ids: "int | list[int] | tuple[int, ...]") -> dict[str, int]:
        """Remove the rows those updates wrote (`Memory.forget`), refilled from this model's initial pool;
        returns the rows removed from short- and long-term memory."""
        return memory.forget(update_ids, self.initial_pool)

    def stream(self, memory: Memory, question: str, max_new_tokens: int = 128, **kw) -> Iterator[str]:
        """Stream the answer to a question as it is generated."""
        return stream(self, memory, question, max_new_tokens=max_new_tokens, **kw)
