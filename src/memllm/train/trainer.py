"""Teach a memory model to use its memory (SPEC §5, MemoryLLM §3.2).

    python -m memllm.train.trainer --model ckpt/ --data corpus.jsonl --out runs/a --steps 1000
    accelerate launch --num_processes 8 -m memllm.train.trainer --model ckpt/ --data corpus.jsonl --out runs/a

Every batch row carries its own memory pool (`pools` [B, L, N, d]): it starts as the checkpoint's
initial pool and keeps every injection of the steps before (detached between steps, reset now and
then), so the model always writes into and reads from a realistic, full memory. Each micro-step
draws one objective by the configured shares:

1. new knowledge: inject x1, predict x2 from memory; the loss backpropagates through the injection;
2. continuous context: inject x1..x(n-1) in turn, predict xn; gradient through the last k injections;
3. forgetting: inject x1 of document A, then distractor contexts of other documents, predict A's x2;
4. plain LM: the full text read against the memory, no injection (keeps the base ability).

M+ checkpoints also train the retriever (`query_proj`, `key_proj`, `encoder_query_proj`, always
trained, whatever `train` says) with the retriever loss of SPEC §5, weighted by `retriever_weight`:

- every pool row carries the id of the document it was written from (`pool_docs` [B, L, N], -1 for
  the initial pool's rows), updated with the same kept indices as the pool;
- decoder side: at the prediction, at every layer l, queries q = query_proj(ln_l(h_l)) from the hidden
  states of the predicted tokens entering layer l; candidates = the pool after the injections plus the
  row's long-term memory (see below); keys k = key_proj(ln_l(row)); score = mean over query tokens of sigmoid(q . k);
  positives = candidates written from the predicted text's document (A's injections: A's x1 for the
  forgetting objective), negatives = all the others (distractors, older rows, the initial pool);
- encoder side: the same with encoder_query_proj and the hidden states of the context being injected
  (encoder adapter) against the pool before that injection plus the long-term memory;
  positives = rows of the same document, i.e. A's earlier contexts. Only injections with such rows
  contribute: in practice the continuous objective's x2..x(n-1), and any document met again;
- loss per (row, layer) = (mean BCE over positives + mean BCE over negatives) / 2, averaged over the
  (row, layer) pairs that have both; the hidden states and rows are detached and the layer norm is not
  trained by it (the published `detach_hidden_state`), so this loss moves the projectors only.

Long-term memory during training: every row also carries a long-term memory (`memllm.core.mplus.RowLTM`,
the newest `ltm_rows` vectors its pool dropped, with their ages and documents), which the prediction
reads through the retriever exactly as inference reads a memory's LTM (merge at every update, no
decay: tested equal), and which joins the pool among the retriever loss's candidates. `ltm_rows 0`
trains without one (retrieved slots masked; candidates = pool + this micro-step's dropped rows). The
trained checkpoint keeps the loaded model's long-term memory, its keys recomputed with the trained
`key_proj`. Per step the metrics log `retriever/loss`, `retriever/encoder_loss` and the retriever's
precision and recall of the related rows at top-k, k = the number of positives (the two are equal
at that k), recall at top-R (R = the retrieval size) and chance (positives / candidates).

Determinism: the objective, the windows, the memory resets and the dropped memory rows of a
micro-step are functions of (seed, micro-step, global row), so a resumed run and a run on any number
of processes (same global batch) train the same way. Dropout is the exception: set `dropout=0` for
bit-for-bit agreement across process counts.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from memllm.train.data import TokenCorpus, read_documents
from memllm.core.inject import delta_memory, dropped_rows
from memllm.core.model import MemoryModel
from memllm.core.mplus import RowLTM, drop_to_ltm
from memllm.train.retriever import (
    layer_inputs,
    refresh_ltm_keys,
    retriever_loss,
    retriever_record,
)

RETRIEVER_PROJECTORS = ("query_proj", "key_proj", "encoder_query_proj")

OBJECTIVES = ("new_knowledge", "continuous", "forgetting", "plain_lm")


@dataclass
class TrainConfig:
    """One training run. Batch size is per process and micro-step: the global batch of one optimizer
    step is batch_size * processes * grad_accum."""

    model: str  # a memllm checkpoint directory (e.g. from `memllm init`)
    data: list[str]  # .txt / .jsonl files or folders, or `datasets` names
    out: str  # output directory: metrics.jsonl, state/ (resume), model/ (the trained checkpoint)
    steps: int = 1000  # optimizer steps
    batch_size: int = 4  # rows per process and micro-step
    grad_accum: int = 1  # micro-steps per optimizer step
    lr: float = 1e-4  # peak learning rate (AdamW), cosine decay to 10%
    weight_decay: float = 0.0  # AdamW weight decay
    warmup_steps: int = 0  # linear warm-up steps
    max_grad_norm: float = 1.0  # gradient clipping (0: none)
    mixed_precision: str = "no"  # "no", "bf16" or "fp16"
    gradient_checkpointing: bool = False  # recompute each injection / read in the backward pass
    seed: int = 0  # everything random: objectives, windows, drops, resets
    new_knowledge: float = 0.4  # share of micro-steps: inject x1, predict x2 (shares are normalised)
    continuous: float = 0.3  # share: inject x1..x(n-1), predict xn
    forgetting: float = 0.2  # share: inject x1, distractors, predict x2
    plain_lm: float = 0.1  # share: plain language modelling read against the memory
    retriever_weight: float = 1.0  # M+ only: weight of the retriever loss next to the LM loss
    ltm_rows: int = -1  # M+ only: long-term vectors kept per row and layer (-1: N; 0: no long-term memory)
    context_len: int = 512  # tokens per context x_i
    min_contexts: int = 3  # continuous objective: n contexts, drawn from [min, max] ...
    max_contexts: int = 6
    contexts_ramp_steps: int = 0  # ... where max grows linearly from min over these steps
    num_distractors: int = 2  # forgetting objective
    grad_last_k: int = 1  # continuous objective: injections the gradient flows through
    train: str = "lora"  # "lora" (the model's adapters) or "full"; bos / positional vectors always
    dropout: float | None = None  # override every dropout probability (0: same result on any process count)
    memory_reset_prob: float = 0.01  # chance per micro-step that a row's memory restarts from the initial pool
    split_blank_lines: bool = False  # .txt files: one document per blank-line-separated block
    max_documents: int | None = None  # read at most this many documents (datasets: the first ones)
    log_every: int = 10  # steps between metrics lines
    save_every: int = 500  # resumable state every this many steps (and at the end)
    resume: bool = True  # continue from out/state if present
    stop_after: int | None = None  # stop (after saving state) at this step: preemption, tests
    dump_params: bool = False  # write each rank's trained parameters to out/params_rank{r}.safetensors
    progress: bool = True  # a progress bar with the losses

    def shares(self) -> dict[str, float]:
        shares = {name: getattr(self, name) for name in OBJECTIVES}
        if min(shares.values()) < 0 or sum(shares.values()) <= 0:
            raise ValueError(f"objective shares must be >= 0 and not all 0, got {shares}")
        return shares

    @classmethod
    def from_args(cls, argv: list[str] | None = None) -> TrainConfig:
        """Parse `--field value` for every field (`--no-flag` for booleans)."""
        parser = argparse.ArgumentParser(prog="memllm.train.trainer", description=__doc__.split("\n")[0])
        add_arguments(parser)
        return cls.from_namespace(parser.parse_args(argv))

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in vars(ns).items() if k in names and v is not None})


def field_help() -> dict[str, str]:
    """Each TrainConfig field's trailing comment (the one place its meaning is written), plus its default."""
    import inspect
    import re

    out = {}
    for line in inspect.getsource(TrainConfig).splitlines():
        m = re.match(r"\s+(\w+): [^#]+#\s*(.+)", line)  # "    name: type = default  # help"
        if m:
            out[m.group(1)] = m.group(2)
    for f in dataclasses.fields(TrainConfig):
        if f.default is not dataclasses.MISSING and f.default is not None:
            out[f.name] = f"{out.get(f.name, '')} (default {f.default})".strip()
    return out


def add_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """One option per TrainConfig field, so the CLI and the config never drift apart."""
    helps = field_help()
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = None if f.default is dataclasses.MISSING else f.default
        required = required and f.default is dataclasses.MISSING
        kw = {"help": helps.get(f.name, "").replace("%", "%%")}  # argparse formats help with %
        if f.name == "data":
            parser.add_argument(flag, nargs="+", required=required, **kw)
        elif isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, **kw)
        elif f.name in ("dropout",):
            parser.add_argument(flag, type=float, default=None, **kw)
        elif f.name in ("stop_after", "max_documents"):
            parser.add_argument(flag, type=int, default=None, **kw)
        elif f.name == "mixed_precision":
            parser.add_argument(flag, choices=["no", "bf16", "fp16"], default=None, **kw)
        elif f.name == "train":
            parser.add_argument(flag, choices=["lora", "full"], default=None, **kw)
        else:
            parser.add_argument(flag, type=type(default) if default is not None else str, required=required,
                                default=None, **kw)


# ---- reading and writing per-row memories --------------------------------------------------------


def read(model: MemoryModel, pool: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
         ltm: RowLTM | None = None):
    """Forward of input_ids [B, T] with row b reading memory pool[b] ([B, L, N, d]) (and, M+, retrieving
    from ltm row b), differentiable in the pool."""
    return model.forward_pools(input_ids, pool, labels=labels, ltm=ltm)


def kept_rows(L: int, N: int, K: int, seed: int, per_layer: bool, device: torch.device) -> torch.Tensor:
    """Random N - K surviving rows per layer [L, N - K], in order; a function of `seed` alone."""
    g = torch.Generator().manual_seed(seed)
    draws = torch.rand(L if per_layer else 1, N, generator=g)
    kept = draws.argsort(dim=-1)[:, : N - K].sort(dim=-1).values
    return kept.expand(L, -1).to(device)


def write(pool: torch.Tensor, delta: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """The functional memory update: pool [B, L, N, d], delta [B, L, K, d], kept [B, L, N-K] -> [B, L, N, d].

    Keeps the autograd graph (through the surviving rows and the new ones), unlike `inject.update`.
    """
    d = pool.shape[-1]
    survivors = pool.gather(2, kept.unsqueeze(-1).expand(-1, -1, -1, d))
    return torch.cat([survivors, delta.to(pool.dtype)], dim=2)


def write_docs(pool_docs: torch.Tensor, doc: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """The document ids of the pool rows after `write`: pool_docs [B, L, N], doc [B] (the injected
    context's document), kept [B, L, N-K] -> [B, L, N]."""
    B, L, N = pool_docs.shape
    K = N - kept.shape[-1]
    return torch.cat([pool_docs.gather(2, kept), doc.view(B, 1, 1).expand(B, L, K).to(pool_docs)], dim=2)


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
                    drop_rows.append(pool.detach().gather(2, gone.unsqueeze(-1).expand(-1, -1, -1, pool.shape[-1])))
                    drop_docs.append(pool_docs.gather(2, gone))
                if track:
                    pool_docs = write_docs(pool_docs, docs[:, i], kept[i])
                pool = write(pool, delta, kept[i])
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


# ---- batches ---------------------------------------------------------------------------------------


@dataclass
class MicroBatch:
    objective: str
    contexts: torch.Tensor  # [B, n, T]
    grad: list[bool]  # per injection
    kept: torch.Tensor  # [n-1, B, L, N-K]
    reset: list[bool]  # per row: restart this row's memory from the initial pool first
    docs: torch.Tensor | None = None  # [B, n] corpus document of each context (where its window starts)


def objective_at(cfg: TrainConfig, micro_step: int) -> str:
    """The objective of a micro-step: the same on every process."""
    shares = cfg.shares()
    rng = random.Random(f"objective:{cfg.seed}:{micro_step}")
    return rng.choices(list(shares), weights=list(shares.values()))[0]


def num_contexts_at(cfg: TrainConfig, step: int, rng: random.Random) -> int:
    """Continuous objective: n contexts, the upper bound ramping from min to max over the first steps."""
    lo, hi = cfg.min_contexts, max(cfg.min_contexts, cfg.max_contexts)
    if cfg.contexts_ramp_steps > 0:
        hi = lo + int((hi - lo) * min(1.0, step / cfg.contexts_ramp_steps))
    return rng.randint(lo, hi)


def make_batch(cfg: TrainConfig, corpus: TokenCorpus, model: MemoryModel, micro_step: int, rows: range) -> MicroBatch:
    """The micro-batch of `rows` (global row indices) at a micro-step: deterministic in (seed, step, row)."""
    objective = objective_at(cfg, micro_step)
    step = micro_step // cfg.grad_accum
    shared = random.Random(f"shape:{cfg.seed}:{micro_step}")  # shapes must agree across rows and ranks
    T = cfg.context_len
    if objective == "new_knowledge" or objective == "plain_lm":
        n, grad = 2, [True]
    elif objective == "continuous":
        n = num_contexts_at(cfg, step, shared)
        grad = [i >= n - 1 - cfg.grad_last_k for i in range(n - 1)]
    else:  # forgetting: A's injection keeps the gradient, the distractors are written without
        n = cfg.num_distractors + 2
        grad = [True] + [False] * cfg.num_distractors
    L, N, K = model.num_layers, model.config.num_memory_tokens, model.config.num_tokens
    contexts, kept, reset, docs = [], [], [], []
    for g in rows:
        rng = random.Random(f"row:{cfg.seed}:{micro_step}:{g}")
        if objective == "forgetting":
            doc, x = corpus.sample(rng, 2, T)
            others = [corpus.sample(rng, 1, T, exclude=doc) for _ in range(cfg.num_distractors)]
            x = torch.cat([x[:1], *(o[1] for o in others), x[1:]])
            docs.append([doc, *(o[0] for o in others), doc])
        else:
            doc, x = corpus.sample(rng, n, T)
            docs.append([doc] * n)
        contexts.append(x)  # [n, T]
        kept.append(torch.stack([kept_rows(L, N, K, rng.getrandbits(63), model.config.drop_memory_per_layer, x.device)
                                 for _ in range(n - 1)]))  # [n-1, L, N-K]
        reset.append(rng.random() < cfg.memory_reset_prob)
    return MicroBatch(objective, torch.stack(contexts), grad, torch.stack(kept, dim=1), reset,
                      torch.tensor(docs, dtype=torch.long))


# ---- what is trained -------------------------------------------------------------------------------


def trainable_parameters(model: MemoryModel, what: str) -> list[nn.Parameter]:
    """Set requires_grad: LoRA adapters (both) or everything, plus the bos and positional vectors,
    plus (M+) the retriever projectors."""
    if what not in ("lora", "full"):
        raise ValueError(f"train must be 'lora' or 'full', got {what!r}")
    if what == "lora" and model.config.lora_config is None:
        raise ValueError("train='lora' but the model has no LoRA adapters: use train='full' or a LoRA checkpoint")
    for name, p in model.named_parameters():
        p.requires_grad_(what == "full" or "lora_" in name)
    model.bos_embedding.requires_grad_(True)
    model.new_memory_positional_emb.requires_grad_(True)
    if model.config.kind == "mplus":
        for layer in model.layers:
            for name in RETRIEVER_PROJECTORS:
                if hasattr(layer.self_attn, name):
                    getattr(layer.self_attn, name).requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def set_dropout(model: nn.Module, p: float) -> None:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = p
    lm_config = model.lm.config if isinstance(model, MemoryModel) else None
    if lm_config is not None and hasattr(lm_config, "attention_dropout"):
        lm_config.attention_dropout = p  # read by the attention layers at every call


# ---- the loop ----------------------------------------------------------------------------------------


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train; returns the final step, mean losses per objective of the last log window and paths.

    CPU floats that underflow to denormals are flushed to zero while training (and only then, also when
    training fails): the retriever's saturated sigmoids give tiny gradients whose squares (Adam) are
    denormal, and CPUs compute on denormals ~10x slower. GPU kernels are unaffected.
    """
    flushed = torch.set_flush_denormal(True)
    try:
        return _train(cfg)
    finally:
        if flushed:
            torch.set_flush_denormal(False)  # the process default


def _train(cfg: TrainConfig) -> dict[str, Any]:
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, DistributedType

    from memllm.core import checkpoint as ckpt

    out = Path(cfg.out)
    tensorboard = importlib.util.find_spec("tensorboard") is not None  # optional: JSONL always
    acc = Accelerator(
        log_with="tensorboard" if tensorboard else None,
        project_dir=cfg.out,
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.grad_accum,
        step_scheduler_with_optimizer=False,  # we step it once per optimizer step, whatever the process count
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],  # objectives use different parts
    )
    if tensorboard:
        acc.init_trackers("tensorboard")
    torch.manual_seed(cfg.seed)
    model = ckpt.load(cfg.model, dtype=torch.float32, load_tokenizer=True)
    mplus = model.config.kind == "mplus"
    if mplus and getattr(model, "initial_ltm", None) is None:
        from memllm.core.ltm import LongTermMemory
        from memllm.core.mplus import ltm_config

        model.initial_ltm = LongTermMemory.empty(ltm_config(model), model.num_layers, model.hidden_size,
                                                 model.config.selector_hidden_dim)
    if model.tokenizer is None:
        raise ValueError(f"{cfg.model} has no tokenizer: training needs one to read the text")
    model.to(acc.device)
    if cfg.dropout is not None:
        set_dropout(model, cfg.dropout)
    corpus = TokenCorpus.from_texts(read_documents(cfg.data, cfg.split_blank_lines, max_documents=cfg.max_documents),
                                    model.tokenizer)
    params = trainable_parameters(model, cfg.train)
    N = model.config.num_memory_tokens
    use_ltm = mplus and cfg.ltm_rows != 0
    module = MemoryTraining(model, cfg.gradient_checkpointing, cfg.retriever_weight,
                            N if cfg.ltm_rows < 0 else cfg.ltm_rows).train()
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    def schedule(step: int) -> float:  # linear warm-up, cosine decay to 10%
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    module, optimizer, scheduler = acc.prepare(module, optimizer, scheduler)

    B, rank = cfg.batch_size, acc.process_index
    rows = range(rank * B, (rank + 1) * B)  # global row indices of this process
    initial = model.initial_pool.detach()  # [L, N, d]
    pools = initial.unsqueeze(0).repeat(B, 1, 1, 1)  # [B, L, N, d] one memory per row
    pool_docs = torch.full(pools.shape[:3], -1, dtype=torch.long, device=acc.device)  # which document wrote each row
    # M+: each row's long-term memory (what its pool dropped) and the ages of its pool rows
    ltm = RowLTM.empty(pools) if use_ltm else None
    stm_ages = torch.zeros(pools.shape[:3], dtype=torch.long, device=acc.device) if use_ltm else None
    step = 0
    state_dir = out / "state"
    if cfg.resume and (state_dir / "latest").is_file():
        last = state_dir / (state_dir / "latest").read_text().strip()
        acc.load_state(str(last))
        step = json.loads((last / "trainer.json").read_text())["step"]
        pools = torch.load(last / f"pools_rank{rank}.pt", map_location=acc.device)
        if (last / f"pool_docs_rank{rank}.pt").is_file():
            pool_docs = torch.load(last / f"pool_docs_rank{rank}.pt", map_location=acc.device)
        if use_ltm and (last / f"ltm_rank{rank}.pt").is_file():
            saved = torch.load(last / f"ltm_rank{rank}.pt", map_location=acc.device)
            ltm, stm_ages = RowLTM(saved["vectors"], saved["ages"], saved["docs"]), saved["stm_ages"]

    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    bar = None
    if cfg.progress and acc.is_local_main_process:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=step, desc="train", dynamic_ncols=True)
    window: dict[str, list[float]] = {}
    retr_window = {"retriever": torch.zeros(6, dtype=torch.float64), "encoder": torch.zeros(6, dtype=torch.float64)}
    last_log: dict[str, float] = {}
    t0 = time.perf_counter()
    end = cfg.steps if cfg.stop_after is None else min(cfg.steps, cfg.stop_after)
    while step < end:
        for micro in range(cfg.grad_accum):
            m = step * cfg.grad_accum + micro
            batch = make_batch(cfg, corpus, model, m, rows)
            torch.manual_seed(hash((cfg.seed, m, rank)) % (1 << 62))  # dropout: reproducible on resume
            for b, reset in enumerate(batch.reset):
                if reset:  # the short-term memory restarts; the long-term one keeps its (now unrelated) rows
                    pools[b] = initial
                    pool_docs[b] = -1
                    if stm_ages is not None:
                        stm_ages[b] = 0
            with acc.accumulate(module):
                loss, pools, info = module(batch.contexts.to(acc.device), pools, batch.grad, batch.kept.to(acc.device),
                                           plain=batch.objective == "plain_lm", docs=batch.docs.to(acc.device),
                                           pool_docs=pool_docs, ltm=ltm, stm_ages=stm_ages)
                acc.backward(loss)
                if acc.sync_gradients and cfg.max_grad_norm:
                    acc.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            pools, pool_docs = pools.detach(), info["pool_docs"]
            ltm, stm_ages = info.get("ltm", ltm), info.get("stm_ages", stm_ages)
            window.setdefault(batch.objective, []).append(acc.reduce(info["lm_loss"], "mean").item())
            if mplus:  # sums over every process (each may have a different number of scored pairs)
                for key in retr_window:
                    stats = info.get(key, torch.zeros(6, dtype=torch.float64)).to(acc.device)
                    retr_window[key] += acc.reduce(stats, "sum").cpu()
        scheduler.step()
        step += 1
        if step % cfg.log_every == 0 or step == end:
            last_log = {k: sum(v) / len(v) for k, v in window.items()}
            record = {"step": step, "lr": scheduler.get_last_lr()[0], "time_s": round(time.perf_counter() - t0, 3),
                      **{f"loss/{k}": v for k, v in last_log.items()}}
            if mplus:
                record.update(retriever_record(retr_window))
                last_log.update({k: v for k, v in record.items() if k.endswith("loss")})
                retr_window = {k: torch.zeros_like(v) for k, v in retr_window.items()}
            if acc.is_main_process:
                with open(out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
            if tensorboard:
                acc.log({k: v for k, v in record.items() if k != "step"}, step=step)
            if bar is not None:
                bar.set_postfix({k[:6]: f"{v:.3f}" for k, v in last_log.items()})
            window = {}
        if bar is not None:
            bar.update(1)
        if step % cfg.save_every == 0 or step == end:
            save_state(acc, state_dir, step, pools, pool_docs, ltm, stm_ages)
    if bar is not None:
        bar.close()

    result: dict[str, Any] = {"step": step, "losses": last_log, "state": str(state_dir)}
    acc.wait_for_everyone()
    unwrapped: MemoryModel = acc.unwrap_model(module).model
    if cfg.dump_params:
        from safetensors.torch import save_file

        save_file({n: p.detach().cpu().contiguous() for n, p in unwrapped.named_parameters() if p.requires_grad},
                  out / f"params_rank{rank}.safetensors")
    sharded = acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    # FSDP / DeepSpeed hold shards: gather every parameter (a collective: all ranks) into a fresh copy
    state = acc.get_state_dict(module) if sharded and step >= cfg.steps else None
    if step >= cfg.steps and acc.is_main_process:
        trained = model_from_state(cfg.model, state) if sharded else unwrapped
        with torch.no_grad():  # the memory of row 0 becomes the checkpoint's trained initial pool
            trained.initial_pool.copy_(pools[0])
        trained.initialized = True
        if mplus:
            refresh_ltm_keys(trained)
        ckpt.save(trained, out / "model")
        result["model"] = str(out / "model")
    acc.wait_for_everyone()
    acc.end_training()
    return result


def model_from_state(model_dir: str, state: dict[str, torch.Tensor]) -> MemoryModel:
    """The checkpoint in model_dir with the gathered training state (keys of `MemoryTraining`:
    "model.<name>") loaded into it: how a sharded run (FSDP, DeepSpeed) gets a whole model to save."""
    from memllm.core import checkpoint as ckpt

    model = ckpt.load(model_dir, dtype=torch.float32, load_tokenizer=True)
    own = model.state_dict()
    weights = {k.removeprefix("model."): v for k, v in state.items()}
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    if missing or unexpected:
        raise ValueError(f"gathered state does not match {model_dir}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in weights.items()})
    return model


def save_state(acc, state_dir: Path, step: int, pools: torch.Tensor, pool_docs: torch.Tensor | None = None,
               ltm: RowLTM | None = None, stm_ages: torch.Tensor | None = None) -> None:
    """Resumable state: accelerate's (model, optimizer, scheduler, RNG), each rank's memories (the
    documents of their rows, M+ their long-term memories), the step. `latest` is written last, so an
    interrupted save leaves the previous state in force."""
    path = state_dir / f"step_{step:08d}"
    acc.save_state(str(path))
    torch.save(pools.cpu(), path / f"pools_rank{acc.process_index}.pt")
    if pool_docs is not None:
        torch.save(pool_docs.cpu(), path / f"pool_docs_rank{acc.process_index}.pt")
    if ltm is not None:
        torch.save({"vectors": ltm.vectors.cpu(), "ages": ltm.ages.cpu(), "docs": ltm.docs.cpu(),
                    "stm_ages": stm_ages.cpu()}, path / f"ltm_rank{acc.process_index}.pt")
    acc.wait_for_everyone()
    if acc.is_main_process:
        (path / "trainer.json").write_text(json.dumps({"step": step}))
        (state_dir / "latest").write_text(path.name)
        for old in sorted(state_dir.glob("step_*"))[:-2]:  # keep the last two
            import shutil

            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()


# ---- measuring -----------------------------------------------------------------------------------


@torch.no_grad()
def memory_loss(model: MemoryModel, contexts: torch.Tensor, seed: int = 0) -> float:
    """Mean loss of x2 read from a fresh memory after injecting x1; contexts [D, 2, T]."""
    D = contexts.shape[0]
    pool = model.initial_pool.detach().unsqueeze(0).repeat(D, 1, 1, 1)
    L, N, K = model.num_layers, model.config.num_memory_tokens, model.config.num_tokens
    kept = torch.stack([kept_rows(L, N, K, seed + i, True, pool.device) for i in range(D)])  # [D, L, N-K]
    pool = write(pool, delta_memory(model, pool, contexts[:, 0]), kept)
    return read(model, pool, contexts[:, 1], labels=contexts[:, 1]).loss.item()


@torch.no_grad()
def retriever_metrics(model: MemoryModel, contexts: torch.Tensor, num_distractors: int = 2,
                      seed: int = 0) -> dict[str, float]:
    """M+: the retriever on the forgetting task from a fresh memory; contexts [D, 2, T] are (x1, x2) of D
    distinct documents. Row i injects x1 of document i, then x1 of the next `num_distractors`
    documents, then predicts x2 of document i. Returns the decoder-side `retriever_record` metrics."""
    D = contexts.shape[0]
    n = num_distractors + 2
    ids = torch.stack([torch.stack([contexts[i, 0], *(contexts[(i + j) % D, 0] for j in range(1, n - 1)),
                                    contexts[i, 1]]) for i in range(D)])
    docs = torch.tensor([[i, *((i + j) % D for j in range(1, n - 1)), i] for i in range(D)])
    pool = model.initial_pool.detach().unsqueeze(0).repeat(D, 1, 1, 1)
    pool_docs = torch.full(pool.shape[:3], -1, dtype=torch.long)
    L, N, K = model.num_layers, model.config.num_memory_tokens, model.config.num_tokens
    kept = torch.stack([torch.stack([kept_rows(L, N, K, seed + 1000 * s + i, True, pool.device) for i in range(D)])
                        for s in range(n - 1)])  # [n-1, D, L, N-K]
    module = MemoryTraining(model)
    _, _, info = module(ids.to(model.device), pool, [False] * (n - 1), kept, docs=docs, pool_docs=pool_docs,
                        ltm=RowLTM.empty(pool), stm_ages=torch.zeros(pool.shape[:3], dtype=torch.long))
    return retriever_record({"retriever": info["retriever"], "encoder": torch.zeros(6, dtype=torch.float64)})


def bench_train_step(
    model: MemoryModel | None = None, batch_size: int = 4, context_len: int = 256, repeats: int = 5
) -> dict[str, float]:
    """Seconds of one new-knowledge training step (inject x1 with gradient, predict x2 from memory,
    backward) against one plain LM step (forward + backward, no memory) on the same 2T tokens."""
    if model is None:
        from memllm.core.tiny import random_model

        model = random_model(num_layers=4, hidden_size=256, num_heads=8, num_kv_heads=4, intermediate_size=688,
                             num_tokens=64, num_blocks=4, lora_rank=8)
    trainable_parameters(model, "lora" if model.config.lora_config is not None else "full")
    module = MemoryTraining(model).train()
    vocab = model.lm.config.vocab_size
    g = torch.Generator().manual_seed(0)
    contexts = torch.randint(0, vocab, (batch_size, 2, context_len), generator=g)
    pool = model.initial_pool.detach().unsqueeze(0).repeat(batch_size, 1, 1, 1)
    L, N, K = model.num_layers, model.config.num_memory_tokens, model.config.num_tokens
    kept = torch.stack([kept_rows(L, N, K, b, True, pool.device) for b in range(batch_size)]).unsqueeze(0)

    def memory_step() -> None:
        loss, _, _ = module(contexts, pool, [True], kept)
        loss.backward()

    def lm_step() -> None:
        with model.adapter("decoder"):
            ids = contexts.reshape(batch_size, -1)
            model.lm(input_ids=ids, labels=ids).loss.backward()

    def once(fn) -> float:
        model.zero_grad(set_to_none=True)
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    lm_step(), memory_step()  # warm-up
    # The two steps take turns, so a change in the machine's load hits both alike.
    times = [(once(lm_step), once(memory_step)) for _ in range(repeats)]
    lm_s = sorted(t[0] for t in times)[repeats // 2]
    mem_s = sorted(t[1] for t in times)[repeats // 2]
    return {"batch_size": batch_size, "context_len": context_len, "memory_vectors": N, "written_per_injection": K,
            "lm_step_s": lm_s, "memory_step_s": mem_s, "memory_step_over_lm_step": mem_s / lm_s}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="memllm.train.trainer", description="Train a memory model to use its memory.")
    parser.add_argument("--bench", action="store_true", help="time a memory training step against an LM step")
    add_arguments(parser, required=False)
    args = parser.parse_args(argv)
    if args.bench:
        result = bench_train_step()
    else:
        missing = [f"--{n}" for n in ("model", "data", "out") if getattr(args, n) is None]
        if missing:
            parser.error(f"the following arguments are required: {', '.join(missing)}")
        result = train(TrainConfig.from_namespace(args))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
