"""What a training step optimises: every objective of `memllm train` and of the tiny recipe, in one
place. All of them write into per-row memory pools with the same memory step (`memllm.core.ops`:
`kept_rows`, `write_pool`, `write_ids`; M+: `drop_to_ltm` into each row's `RowLTM`).

Corpus objectives (`memllm train`, SPEC §5, MemoryLLM §3.2), one `MemoryTraining` forward each; they
differ in the layout of the micro-batch (`CORPUS_OBJECTIVES`):

1. `new_knowledge`: inject x1, predict x2 from memory; the loss backpropagates through the injection;
2. `continuous`: inject x1..x(n-1) in turn, predict xn; gradient through the last k injections;
3. `forgetting`: inject x1 of document A, then distractor contexts of other documents, predict A's x2;
4. `plain_lm`: the full text read against the memory, no injection (keeps the base ability).

M+ also trains the retriever (`query_proj`, `key_proj`, `encoder_query_proj`) with the retriever
loss of SPEC §5 (`memllm.train.retriever`), weighted by `retriever_weight`:

- every pool row carries the id of the document it was written from (`pool_docs` [B, L, N], -1 for
  the initial pool's rows), updated with the same kept indices as the pool;
- decoder side: at the prediction, at every layer l, queries q = query_proj(ln_l(h_l)) from the hidden
  states of the predicted tokens entering layer l; candidates = the pool after the injections plus the
  row's long-term memory; keys k = key_proj(ln_l(row)); score = mean over query tokens of sigmoid(q . k);
  positives = candidates written from the predicted text's document (A's injections: A's x1 for the
  forgetting objective), negatives = all the others (distractors, older rows, the initial pool);
- encoder side: the same with encoder_query_proj and the hidden states of the context being injected
  (encoder adapter) against the pool before that injection plus the long-term memory;
  positives = rows of the same document, i.e. A's earlier contexts. Only injections with such rows
  contribute: in practice the continuous objective's x2..x(n-1), and any document met again;
- loss per (row, layer) = (mean BCE over positives + mean BCE over negatives) / 2, averaged over the
  (row, layer) pairs that have both; the hidden states and rows are detached and the layer norm is not
  trained by it (the published `detach_hidden_state`), so this loss moves the projectors only.

Long-term memory during training: every row carries a long-term memory (`memllm.core.mplus.RowLTM`,
the newest `ltm_rows` vectors its pool dropped, with their ages and documents), which the prediction
reads through the retriever exactly as inference reads a memory's LTM (merge at every update, no
decay: tested equal), and which joins the pool among the retriever loss's candidates. Without one
(`ltm_rows 0`) the retrieved slots are masked and the candidates are the pool plus this micro-step's
dropped rows.

Question-answering objectives (the tiny recipe, `memllm.recipes.tiny`):

5. `context_qa`: in-context QA, the loss on the answer plus a weighted LM loss on the context;
   `lookup_qa`: several questions per context, plus the subject loss (`SubjectHead`), which is what
   made lookup by name learnable;
6. `memory_qa`: memory QA, every text written into per-row memories (gradient through the asked
   person's injection), the loss on the answer; M+ adds the retriever loss whose positives are the
   asked person's vectors in long-term memory.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from memllm.core.inject import delta_memory
from memllm.core.model import MemoryModel
from memllm.core.mplus import RowLTM, drop_to_ltm
from memllm.core.ops import dropped_rows, gather_rows, write_ids, write_pool
from memllm.train.data import ContextBatch, LookupBatch, MemoryBatch, pad
from memllm.train.retriever import layer_inputs, retriever_loss

if TYPE_CHECKING:
    from memllm.train.trainer import TrainConfig


# ---- corpus objectives: the layout of a micro-batch ------------------------------------------------


@dataclass
class Layout:
    """A corpus micro-batch: n contexts per row, the last one predicted."""

    contexts: int  # n
    grad: list[bool]  # per injected context: does the gradient flow through its injection
    distractors: int = 0  # contexts 1..n-2 come from other documents (A's x1, distractors, A's x2)
    inject: bool = True  # False: read all n contexts as one text against the memory, no injection


def new_knowledge(cfg: TrainConfig, step: int, rng: random.Random) -> Layout:
    return Layout(2, [True])


def continuous(cfg: TrainConfig, step: int, rng: random.Random) -> Layout:
    """n contexts drawn from [min_contexts, max], max ramping up from min over contexts_ramp_steps."""
    lo, hi = cfg.min_contexts, max(cfg.min_contexts, cfg.max_contexts)
    if cfg.contexts_ramp_steps > 0:
        hi = lo + int((hi - lo) * min(1.0, step / cfg.contexts_ramp_steps))
    n = rng.randint(lo, hi)
    return Layout(n, [i >= n - 1 - cfg.grad_last_k for i in range(n - 1)])


def forgetting(cfg: TrainConfig, step: int, rng: random.Random) -> Layout:
    """A's injection keeps the gradient, the distractors are written without."""
    return Layout(cfg.num_distractors + 2, [True] + [False] * cfg.num_distractors, distractors=cfg.num_distractors)


def plain_lm(cfg: TrainConfig, step: int, rng: random.Random) -> Layout:
    return Layout(2, [True], inject=False)


CORPUS_OBJECTIVES: dict[str, Callable[[TrainConfig, int, random.Random], Layout]] = {
    "new_knowledge": new_knowledge, "continuous": continuous, "forgetting": forgetting, "plain_lm": plain_lm,
}


# ---- corpus objectives: the computation ------------------------------------------------------------


def read(model: MemoryModel, pool: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
         ltm: RowLTM | None = None):
    """Forward of input_ids [B, T] with row b reading memory pool[b] ([B, L, N, d]) (and, M+, retrieving
    from ltm row b), differentiable in the pool."""
    return model.forward_pools(input_ids, pool, labels=labels, ltm=ltm)


class MemoryTraining(nn.Module):
    """The whole training computation of one micro-step as one module forward: injections, the
    prediction and its loss (plus, for M+, the retriever loss). One forward per backward is what
    DDP / FSDP wrappers expect."""

    def __init__(self, model: MemoryModel, gradient_checkpointing: bool = False, retriever_weight: float = 1.0,
                 ltm_rows: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.gradient_checkpointing = gradient_checkpointing
        self.retriever_weight = retriever_weight
        self.ltm_rows = ltm_rows  # long-term rows kept per row and layer (None: all)

    def forward(
        self,
        contexts: torch.Tensor,  # [B, n, T]: contexts 0..n-2 are injected, n-1 is predicted
        pool: torch.Tensor,  # [B, L, N, d], detached
        grad: list[bool],  # per injected context: does the gradient flow through its injection
        kept: torch.Tensor,  # [n-1, B, L, N-K] rows surviving each injection
        plain: bool = False,  # plain LM: no injection, predict all contexts as one text
        docs: torch.Tensor | None = None,  # [B, n] document of each context (M+ retriever loss)
        pool_docs: torch.Tensor | None = None,  # [B, L, N] document of each pool row, -1: unknown
        ltm: RowLTM | None = None,  # M+: each row's long-term memory (needs docs and pool_docs)
        stm_ages: torch.Tensor | None = None,  # [B, L, N] with ltm: ages of the pool rows
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """(loss, pool after the injections (detached), info).

        info: "lm_loss" (detached); with docs and pool_docs also "pool_docs" after the injections; for
        an M+ model with docs, "retriever" and "encoder" [6] statistics (see `retriever_loss`) and the
        loss includes retriever_weight * (decoder + encoder retriever losses); with ltm, "ltm" and
        "stm_ages" after the injections (every dropped row joins the long-term memory, which the
        prediction reads and the retriever's candidates include).
        """
        model = self.model
        B, n, T = contexts.shape
        N = pool.shape[2]
        track = docs is not None and pool_docs is not None
        if ltm is not None and (not track or stm_ages is None):
            raise ValueError("training with a long-term memory needs docs, pool_docs and stm_ages")
        retriever = track and model.config.kind == "mplus" and self.retriever_weight > 0
        encoder = retriever and model.config.add_encoder_retriever
        info: dict[str, Any] = {}
        extra = []  # retriever losses
        drop_rows: list[torch.Tensor] = []  # without ltm: rows dropped in this micro-step [B, L, K, d]
        drop_docs: list[torch.Tensor] = []

        def candidates(pool: torch.Tensor, pool_docs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            """Retriever candidates [B, L, C, d] and their documents: the pool and the long-term memory
            (without one, the rows dropped in this micro-step)."""
            more, more_docs = ([ltm.vectors], [ltm.docs]) if ltm is not None else (drop_rows, drop_docs)
            return torch.cat([pool.detach(), *more], dim=2), torch.cat([pool_docs, *more_docs], dim=2)

        if plain:
            captured: dict[int, torch.Tensor] = {}
            text = contexts.reshape(B, n * T)
            loss = self._read(pool, text, captured if retriever else None, ltm)
        else:
            for i in range(n - 1):
                ids = contexts[:, i]
                captured = {}
                if grad[i]:
                    delta = self._inject(pool, ids, captured if encoder else None)  # [B, L, K, d]
                else:
                    with torch.no_grad(), layer_inputs(model, captured, T) if encoder else _nothing():
                        delta = delta_memory(model, pool.detach(), ids)
                if encoder:
                    cand, cand_docs = candidates(pool, pool_docs)
                    positive = (cand_docs == docs[:, i].view(B, 1, 1)) & (cand_docs >= 0)
                    if bool(positive.any()):
                        e_loss, e_stats = retriever_loss(model, captured, cand, positive, "encoder_query_proj")
                        extra.append(e_loss)
                        info["encoder"] = info.get("encoder", 0) + e_stats
                if ltm is not None:
                    ltm, stm_ages = drop_to_ltm(ltm, pool, stm_ages, kept[i], pool_docs,
                                                model.config.stm_ages_grow, self.ltm_rows)
                elif track:
                    gone = dropped_rows(kept[i], N)  # [B, L, K]
                    drop_rows.append(gather_rows(pool.detach(), gone))
                    drop_docs.append(pool_docs.gather(2, gone))
                if track:
                    pool_docs = write_ids(pool_docs, docs[:, i], kept[i])
                pool = write_pool(pool, delta, kept[i])
            captured = {}
            loss = self._read(pool, contexts[:, -1], captured if retriever else None, ltm)
        info["lm_loss"] = loss.detach()
        if retriever:
            cand, cand_docs = candidates(pool, pool_docs)
            positive = (cand_docs == docs[:, -1].view(B, 1, 1)) & (cand_docs >= 0)
            r_loss, info["retriever"] = retriever_loss(model, captured, cand, positive, "query_proj")
            extra.append(r_loss)
            info.setdefault("encoder", torch.zeros(6, dtype=torch.float64))
        if extra:
            loss = loss + self.retriever_weight * sum(extra)
        if track:
            info["pool_docs"] = pool_docs
        if ltm is not None:
            info["ltm"], info["stm_ages"] = ltm, stm_ages
        return loss, pool.detach(), info

    def _inject(self, pool: torch.Tensor, ids: torch.Tensor, captured: dict | None = None) -> torch.Tensor:
        def inject(pool: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
            with layer_inputs(self.model, captured, ids.shape[1]) if captured is not None else _nothing():
                return delta_memory(self.model, pool, ids)

        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(inject, pool, ids, use_reentrant=False)
        return inject(pool, ids)

    def _read(self, pool: torch.Tensor, ids: torch.Tensor, captured: dict | None = None,
              ltm: RowLTM | None = None) -> torch.Tensor:
        def loss(pool: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
            with layer_inputs(self.model, captured, ids.shape[1]) if captured is not None else _nothing():
                return read(self.model, pool, ids, labels=ids, ltm=ltm).loss

        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(loss, pool, ids, use_reentrant=False)
        return loss(pool, ids)


@contextmanager
def _nothing() -> Iterator[None]:
    yield



# ---- question-answering objectives (the tiny recipe) -----------------------------------------------


def context_qa(model: MemoryModel, cb: ContextBatch, lm_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """In-context QA: (answer loss + lm_weight * LM loss on the context, correct [B] bool)."""
    logits = model.lm(cb.ids).logits  # [B, T, V]
    rows = torch.arange(len(cb.ids))
    at_answer = logits[rows, cb.answer_pos]
    loss = F.cross_entropy(at_answer, cb.answers)
    if lm_weight:
        T = cb.ids.shape[1]
        in_context = torch.arange(T - 1).unsqueeze(0) < (cb.context_len - 1).unsqueeze(1)  # [B, T-1]
        target = cb.ids[:, 1:].masked_fill(~in_context, -100)
        loss = loss + lm_weight * F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                  ignore_index=-100)
    return loss, at_answer.argmax(-1) == cb.answers


class SubjectHead(nn.Module):
    """A training-only probe: from the hidden state after `layer` decoder layers, the first and the last
    token of the name of the person the current text (or question) is about, at every token after the
    name. Its loss makes the model carry *who* a text is about along the text and into the question,
    the binding that lookup by name needs: with the answer loss alone a tiny model copied the asked kind
    of fact from a random person for thousands of steps; with this loss, lookup among 8 people appeared
    within 1,300 steps (docs/tinymodel.md). Not part of the model: it is dropped after training."""

    def __init__(self, hidden_size: int, vocab_size: int, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.proj = nn.Linear(hidden_size, 2 * vocab_size)

    def loss(self, hidden_states: tuple[torch.Tensor, ...], subjects: torch.Tensor) -> torch.Tensor:
        """In context: the hidden states after `layer` layers against subjects [B, T, 2] (-100: none)."""
        return self.loss_on(hidden_states[self.layer], subjects)

    def loss_on(self, h: torch.Tensor, subjects: torch.Tensor) -> torch.Tensor:
        """Rows h [B, T, d] (hidden states, or memory rows) against subjects [B, T, 2] (-100: none)."""
        logits = self.proj(h).view(*h.shape[:2], 2, -1)  # [B, T, 2, V]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), subjects.reshape(-1), ignore_index=-100)


def lookup_qa(model: MemoryModel, lb: LookupBatch, lm_weight: float, subject: SubjectHead | None = None,
              subject_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """In-context lookup: (answer loss + lm_weight * LM loss on the texts + subject_weight * subject
    loss, correct [answers] bool in row-major order)."""
    out = model.lm(lb.ids, output_hidden_states=subject is not None)
    logits = out.logits  # [B, T, V]
    asked = lb.answers != -100
    loss = F.cross_entropy(logits[asked], lb.answers[asked])
    if lm_weight:
        loss = loss + lm_weight * F.cross_entropy(logits.reshape(-1, logits.shape[-1]), lb.lm_targets.reshape(-1),
                                                  ignore_index=-100)
    if subject is not None and subject_weight:
        loss = loss + subject_weight * subject.loss(out.hidden_states, lb.subjects)
    return loss, logits[asked].argmax(-1) == lb.answers[asked]


def start_pools(model: MemoryModel, batch: int) -> torch.Tensor:
    """One fresh memory per row: the initial pool [B, L, N, d], detached."""
    return model.initial_pool.detach().unsqueeze(0).expand(batch, -1, -1, -1).clone()


def inject_rows(model: MemoryModel, pools: torch.Tensor, rows: list[list[int]], kept: torch.Tensor,
                grad: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Write one context of any length per row into pools [B, L, N, d]: (new pools, the delta memory
    [B, L, K, d] written, whose last min(len, K) rows per row and layer are its context's last tokens).
    The write keeps the graph of the surviving rows; `grad=False` computes the new rows without one
    (cheap distractors)."""
    ids = pad(rows, 0)
    mask = pad([[1] * len(r) for r in rows], 0)
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        delta = delta_memory(model, pools, ids, mask)
    return write_pool(pools, delta, kept), delta


class MemoryQA(NamedTuple):
    loss: torch.Tensor  # answer loss + retriever_weight * retriever loss: what is optimised
    correct: torch.Tensor  # [B] bool: the argmax answer is right
    retriever: torch.Tensor | None  # [6] retriever statistics (see `retriever_loss`), None: no pair scored
    answer_loss: float  # the answer loss alone


def memory_qa(model: MemoryModel, mb: MemoryBatch, retriever_weight: float = 0.0, subject: SubjectHead | None = None,
              subject_weight: float = 0.0, recall_weight: float = 0.0) -> MemoryQA:
    """Memory QA after writing every text of the batch into fresh per-row memories, the gradient
    flowing through the target's injection. The loss is on the answer token, plus:
    - M+: retriever_weight times the retriever loss whose positives are the asked person's vectors in
      long-term memory;
    - with a subject head, subject_weight times its loss on the memory rows the target's injection
      wrote for layer `subject.layer` (the rows that layer reads name whom they are about, as its
      in-context inputs do);
    - recall_weight times the LM loss of the target's text read back from the memory (M+: short- and
      long-term): a loss on every token, where the answer gives one per row. An in-context lookup model learned to
      read its memory only with it (docs/tinymodel.md)."""
    B = mb.questions.shape[0]
    pools = start_pools(model, B)
    extra = torch.zeros(())  # the subject loss on the target's memory rows
    mplus = model.config.kind == "mplus"
    if mplus:  # long-term memory per row, and which injection wrote each vector
        L, N = pools.shape[1:3]
        ltm, ages = RowLTM.empty(pools), torch.zeros(B, L, N, dtype=torch.long)
        written_by = torch.full((B, L, N), -1, dtype=torch.long)
    for i, rows in enumerate(mb.texts):
        if mplus:
            ltm, ages = drop_to_ltm(ltm, pools, ages, mb.kept[i], written_by)
            written_by = write_ids(written_by, torch.full((B,), i), mb.kept[i])
        pools, delta = inject_rows(model, pools, rows, mb.kept[i], grad=i == mb.target)
        if i == mb.target and subject is not None and subject_weight and mb.target_subjects is not None:
            extra = subject_weight * subject.loss_on(delta[:, subject.layer], mb.target_subjects)  # rows [B, K, d]
    captured: dict[int, torch.Tensor] = {}
    if mplus:
        q_mask = (mb.labels == -100) & (mb.questions != model.tokenizer.pad_token_id)
        with layer_inputs(model, captured, mb.questions.shape[1]):
            logits = model.forward_pools(mb.questions, pools, ltm=ltm, attention_mask=q_mask.long()).logits[:, :-1]
    else:
        logits = model.forward_pools(mb.questions, pools).logits[:, :-1]
    target = mb.labels[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100)
    mask = target != -100
    correct = logits.argmax(-1)[mask] == target[mask]  # one answer per row, in row order
    answer_loss, stats = loss.item(), None
    loss = loss + extra
    if recall_weight:  # M+: the text is also the query that retrieves from long-term memory
        rows = mb.texts[mb.target]
        text_mask = pad([[1] * len(r) for r in rows], 0) if mplus else None
        loss = loss + recall_weight * model.forward_pools(pad(rows, model.tokenizer.pad_token_id), pools,
                                                          labels=pad(rows, -100), ltm=ltm if mplus else None,
                                                          attention_mask=text_mask).loss
    if mplus and ltm.size:
        positive = (ltm.docs == mb.target) & ~mb.strangers.view(B, 1, 1)
        r_loss, stats = retriever_loss(model, captured, ltm.vectors, positive)
        loss = loss + retriever_weight * r_loss
    return MemoryQA(loss, correct, stats, answer_loss)
