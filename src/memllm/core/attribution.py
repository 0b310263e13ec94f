"""Answer attribution: which updates' memory rows an answer was read from.

Every memory row carries the id of the update that wrote it (`Memory.sources`, and per long-term row
`LTMLayer.sources`). An answer's tokens attend to the memory prefix at every layer; summing that
attention per source update says which injections the answer drew on. `explain` measures it with a
separate forward over [question ; answer] read against the memory, exactly as `ask` reads it (same
prefix, same M+ retrieval, made from the question's tokens only), and recomputes each layer's
attention weights from its own projections: softmax(q . k / sqrt(head_dim)) over [prefix ; text],
with q = RoPE(q_proj(input_layernorm(h))) of the tokens that predict the answer (the last question
token and the answer's tokens but the last) and k the layer's cached keys. Generation itself is
untouched.

Attention mass is a measure of where the model looked, not a causal proof of where the answer came
from; forgetting the top source and asking again is the causal check (`memllm eval forgetting`).
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from memllm.core import hf_compat
from memllm.core.generate import encode_prompt
from memllm.core.memory import Memory
from memllm.core.mplus import ltm_is_empty, retrieving

if TYPE_CHECKING:
    from memllm.core.model import MemoryModel


@dataclass(frozen=True)
class Attribution:
    """Where an answer's attention to memory went.

    shares: source update id -> its share of the attention mass on memory rows (short-term and
        retrieved long-term rows; bos excluded), summing to 1, largest first. 0 is the initial memory.
    memory_mass: the mean share of the answer tokens' attention (over layers, heads, tokens) that falls
        on memory rows at all, rather than on bos or the text.
    retrieved_share: of the memory mass, the part on retrieved long-term rows (M+; 0 for MemoryLLM).
    """

    answer: str
    answer_ids: tuple[int, ...]
    shares: dict[int, float]
    memory_mass: float
    retrieved_share: float

    def top(self, n: int = 3, updates_only: bool = False) -> list[tuple[int, float]]:
        """The n sources with the largest shares, largest first. With `updates_only`, injected updates
        only (ids > 0: not the initial memory, 0, nor rows of unknown origin, -1), which answers "which
        document did this come from": in a young memory most rows are still the initial pool's, so
        their summed share tops the full list whatever the question."""
        ranked = [(u, s) for u, s in self.shares.items() if u > 0 or not updates_only]
        return ranked[:n]


def explain(
    model: "MemoryModel",
    memory: Memory,
    question: str,
    answer_ids: "torch.Tensor | list[int] | None" = None,
    max_new_tokens: int = 32,
    chat: bool | None = None,
    **generate_kwargs,
) -> Attribution:
    """Attribute an answer to the updates that wrote the memory rows it attended to.

    `answer_ids` [A]: the answer's tokens (e.g. what `generate` returned after the question); None:
    answer first, as `ask` does (greedy unless `generate_kwargs` say otherwise). Raises ValueError for
    an uninitialised memory (no rows) or an empty answer.
    """
    if not memory.initialized:
        raise ValueError("an uninitialised memory has no rows to attribute an answer to")
    enc = encode_prompt(model, question, chat)
    prompt = enc["input_ids"]  # [1, T]
    if answer_ids is None:
        generate_kwargs.setdefault("do_sample", False)
        out = model.generate(memory, prompt, enc["attention_mask"], max_new_tokens=max_new_tokens, **generate_kwargs)
        answer_ids = out[0, prompt.shape[1]:]
    answer = torch.as_tensor(answer_ids, dtype=torch.long).reshape(-1).to(prompt.device)
    if answer.numel() == 0:
        raise ValueError("the answer has no tokens to attribute")
    with model.using_tokenizer() as tok:
        text = tok.decode(answer, skip_special_tokens=True)
    mass, retrieved_sources = _prefix_attention(model, memory, prompt, answer)
    shares, retrieved, on_memory = _per_source(model, memory, mass, retrieved_sources)
    total = sum(shares.values())
    ranked = dict(sorted(((u, m / total) for u, m in shares.items()), key=lambda kv: -kv[1])) if total else {}
    return Attribution(text, tuple(answer.tolist()), ranked, on_memory,
                       retrieved / total if total else 0.0)


def _prefix_attention(model: "MemoryModel", memory: Memory, prompt: torch.Tensor,
                      answer: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """Per layer: the mean attention weight [P] of the answer-predicting queries on each prefix row,
    and the source ids [R] of the long-term rows retrieval put in that layer's prefix (None: none)."""
    T, A = prompt.shape[1], answer.shape[0]
    ids = torch.cat([prompt[0], answer[:-1]]).unsqueeze(0)  # [1, T + A - 1]
    question_only = torch.zeros_like(ids)
    question_only[:, :T] = 1  # M+ retrieves with the question's tokens, as `ask` does in its prefill
    mass: list[torch.Tensor] = [torch.empty(0)] * model.num_layers
    with torch.no_grad(), model.adapter("decoder"), ExitStack() as stack:
        inputs = model.prepare(memory, ids)
        cache = inputs[hf_compat.CACHE_ARG]
        P = inputs["attention_mask"].shape[1] - ids.shape[1]
        prefix_open = inputs["attention_mask"][0, :P].bool()  # [P]: placeholders of an empty LTM are closed
        positions = inputs["position_ids"]  # [1, S]
        trace: list = []
        if model.config.kind == "mplus" and not ltm_is_empty(memory):
            stack.enter_context(retrieving(model, memory, cache, question_only, trace, model.retrieval_mode))

        def capture(l: int):
            def hook(module, args, kwargs, output):
                hidden = hf_compat.layer_hidden(args, kwargs)  # [1, S, d]
                keys = hf_compat.layer_kv(cache, l)[0].float()  # [1, kv_heads, P + S, hd]
                q = _queries(model, l, hidden, positions)[:, :, -A:].float()  # [1, H, A, hd]
                keys = keys.repeat_interleave(q.shape[1] // keys.shape[1], dim=1)  # GQA: [1, H, P + S, hd]
                logits = q @ keys.transpose(-1, -2) * hf_compat.attention_scaling(module)  # [1, H, A, P + S]
                S = hidden.shape[1]
                query_at = torch.arange(S - A, S, device=logits.device).unsqueeze(1)  # [A, 1] text positions
                key_at = torch.arange(P + S, device=logits.device) - P  # [P + S], prefix < 0
                allowed = (key_at <= query_at) & torch.cat([prefix_open.to(logits.device),
                                                            torch.ones(S, dtype=torch.bool, device=logits.device)])
                weights = logits.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
                mass[l] = weights[0, :, :, :P].mean(dim=(0, 1)).cpu()  # [P]
            return hook

        with model.layer_hooks(post=capture):
            model.lm(**inputs, use_cache=True)
    retrieved: list[torch.Tensor | None] = [None] * model.num_layers
    for l, results in trace:
        retrieved[l] = memory.ltm.layers[l].row_sources(results[0].order)
    return mass, retrieved


def _queries(model: "MemoryModel", l: int, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The layer's attention queries of hidden [B, S, d], rotated at `positions`: [B, heads, S, head_dim]."""
    layer = model.layers[l]
    q = hf_compat.project_q(layer, hf_compat.input_norm(layer)(hidden))
    cos, sin = model.rope(hidden, positions.to(hidden.device))
    return hf_compat.apply_rotary(q, cos, sin)


def _per_source(model: "MemoryModel", memory: Memory, mass: list[torch.Tensor],
                retrieved: list[torch.Tensor | None]) -> tuple[dict[int, float], float, float]:
    """Sum each layer's prefix mass per source update: [bos ; R retrieved ; N short-term rows].
    Returns (mass per source, mass on retrieved rows, mean memory mass per layer)."""
    R = model.config.num_retrieved
    sources, weights = [], []
    on_retrieved = 0.0
    for l, m in enumerate(mass):
        sources.append(memory.sources[l].cpu())
        weights.append(m[1 + R:])
        if retrieved[l] is not None:
            sources.append(retrieved[l])
            weights.append(m[1:1 + R])
            on_retrieved += float(m[1:1 + R].sum())
    ids, where = torch.unique(torch.cat(sources), return_inverse=True)
    totals = torch.zeros(ids.shape[0], dtype=torch.float64).index_add_(0, where, torch.cat(weights).double())
    on_memory = float(sum(m[1:].sum() for m in mass)) / len(mass)
    return dict(zip(ids.tolist(), totals.tolist())), on_retrieved, on_memory
