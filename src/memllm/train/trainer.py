"""Teach a memory model to use its memory (SPEC §5, MemoryLLM §3.2): `memllm train`.

    memllm train --model ckpt/ --data corpus.jsonl --out runs/a --steps 1000
    accelerate launch --num_processes 8 -m memllm train --model ckpt/ --data corpus.jsonl --out runs/a

Every batch row carries its own memory pool (`RowMemories`: pools [B, L, N, d], the document of each
row, M+ a long-term memory): it starts as the checkpoint's initial pool and keeps every injection of
the steps before (detached between steps, reset now and then), so the model always writes into and
reads from a realistic, full memory. Each micro-step draws one corpus objective by the configured
shares (`memllm.train.objectives`: new knowledge, continuous context, forgetting, plain LM; M+ adds
the retriever loss, weighted by `retriever_weight`, and every row reads its long-term memory) and
the one training loop (`memllm.train.loop.fit`) takes the optimizer steps, under accelerate.

The trained checkpoint keeps the loaded model's long-term memory, its keys recomputed with the
trained `key_proj`. Per step the metrics log the LM loss per objective and, M+, `retriever/loss`,
`retriever/encoder_loss` and the retriever's precision and recall of the related rows at top-k, k =
the number of positives (the two are equal at that k), recall at top-R (R = the retrieval size) and
chance (positives / candidates).

Determinism: the objective, the windows, the memory resets and the dropped memory rows of a
micro-step are functions of (seed, micro-step, global row), so a resumed run and a run on any number
of processes (same global batch) train the same way. Dropout is the exception: set `dropout=0` for
bit-for-bit agreement across process counts.
"""

from __future__ import annotations

import importlib.util
import json
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from memllm.core import hf_compat
from memllm.core.inject import delta_memory
from memllm.core.model import MemoryModel
from memllm.core.mplus import RowLTM
from memllm.core.ops import kept_rows, write_pool
from memllm.train.data import CorpusBatch, TokenCorpus, read_documents
from memllm.train.loop import EMA, DataHash, fit, make_optimizer
from memllm.train.objectives import CORPUS_OBJECTIVES, MemoryTraining, read
from memllm.train.options import option
from memllm.train.retriever import refresh_ltm_keys, retriever_record

RETRIEVER_PROJECTORS = ("query_proj", "key_proj", "encoder_query_proj")

OBJECTIVES = tuple(CORPUS_OBJECTIVES)


@dataclass
class TrainConfig:
    """One training run. Batch size is per process and micro-step: the global batch of one optimizer
    step is batch_size * processes * grad_accum."""

    model: str = option(help="a memllm checkpoint directory (e.g. from `memllm init`)")
    data: list[str] = option(help=".txt / .jsonl files or folders, or `datasets` names")
    out: str = option(help="output directory: metrics.jsonl, state/ (resume), model/ (the trained checkpoint)")
    steps: int = option(1000, "optimizer steps: the learning-rate schedule runs over them")
    batch_size: int = option(4, "rows per process and micro-step")
    grad_accum: int = option(1, "micro-steps per optimizer step")
    lr: float = option(1e-4, "peak learning rate (AdamW): linear warm-up, then cosine decay to 10%")
    weight_decay: float = option(0.0, "AdamW weight decay")
    warmup_steps: int = option(0, "linear warm-up steps")
    max_grad_norm: float = option(1.0, "gradient clipping (0: none)")
    max_minutes: float = option(0.0, "a cap on training time (0: none); a run that hits it saves, and says so")
    ema: float = option(0.0, "decay of an exponential moving average of the weights, which is then what is "
                             "saved (0: none, the trained weights are saved)")
    mixed_precision: str = option("no", "mixed precision", choices=("no", "bf16", "fp16"))
    gradient_checkpointing: bool = option(False, "recompute each injection / read in the backward pass")
    seed: int = option(0, "everything random: objectives, windows, drops, resets")
    new_knowledge: float = option(0.4, "share of micro-steps: inject x1, predict x2 (shares are normalised)")
    continuous: float = option(0.3, "share: inject x1..x(n-1), predict xn")
    forgetting: float = option(0.2, "share: inject x1, distractors, predict x2")
    plain_lm: float = option(0.1, "share: plain language modelling read against the memory")
    retriever_weight: float = option(1.0, "M+ only: weight of the retriever loss next to the LM loss")
    ltm_rows: int = option(-1, "M+ only: long-term vectors kept per row and layer (-1: N; 0: no long-term memory)")
    context_len: int = option(512, "tokens per context x_i")
    min_contexts: int = option(3, "continuous objective: n contexts, drawn from [min_contexts, max_contexts] ...")
    max_contexts: int = option(6, "... the upper end of that range")
    contexts_ramp_steps: int = option(0, "... which grows linearly from min_contexts over these steps")
    num_distractors: int = option(2, "forgetting objective: distractor contexts between x1 and x2")
    grad_last_k: int = option(1, "continuous objective: injections the gradient flows through")
    train: str = option("lora", "what is trained: the model's LoRA adapters or everything; bos / positional "
                                "vectors always", choices=("lora", "full"))
    dropout: float | None = option(None, "override every dropout probability (0: same result on any process count)")
    memory_reset_prob: float = option(0.01, "chance per micro-step that a row's memory restarts from the initial pool")
    split_blank_lines: bool = option(False, ".txt files: one document per blank-line-separated block")
    max_documents: int | None = option(None, "read at most this many documents (datasets: the first ones)")
    log_every: int = option(10, "steps between metrics lines")
    save_every: int = option(500, "resumable state every this many steps (and at the end)")
    resume: bool = option(True, "continue from out/state if present")
    stop_after: int | None = option(None, "stop (after saving state) at this step: preemption, tests")
    dump_params: bool = option(False, "write each rank's trained parameters to out/params_rank{r}.safetensors")
    progress: bool = option(True, "a progress bar with the losses")

    def shares(self) -> dict[str, float]:
        shares = {name: getattr(self, name) for name in OBJECTIVES}
        if min(shares.values()) < 0 or sum(shares.values()) <= 0:
            raise ValueError(f"objective shares must be >= 0 and not all 0, got {shares}")
        return shares


# ---- batches ---------------------------------------------------------------------------------------


def objective_at(cfg: TrainConfig, micro_step: int) -> str:
    """The objective of a micro-step: the same on every process."""
    shares = cfg.shares()
    rng = random.Random(f"objective:{cfg.seed}:{micro_step}")
    return rng.choices(list(shares), weights=list(shares.values()))[0]


def make_batch(cfg: TrainConfig, corpus: TokenCorpus, model: MemoryModel, micro_step: int, rows: range) -> CorpusBatch:
    """The micro-batch of `rows` (global row indices) at a micro-step: deterministic in (seed, step, row)."""
    objective = objective_at(cfg, micro_step)
    shared = random.Random(f"shape:{cfg.seed}:{micro_step}")  # shapes must agree across rows and ranks
    layout = CORPUS_OBJECTIVES[objective](cfg, micro_step // cfg.grad_accum, shared)
    n, T = layout.contexts, cfg.context_len
    L, N, K = model.num_layers, model.config.num_memory_tokens, model.config.num_tokens
    contexts, kept, reset, docs = [], [], [], []
    for g in rows:
        rng = random.Random(f"row:{cfg.seed}:{micro_step}:{g}")
        if layout.distractors:  # A's x1, distractors, A's x2
            doc, x = corpus.sample(rng, 2, T)
            others = [corpus.sample(rng, 1, T, exclude=doc) for _ in range(layout.distractors)]
            x = torch.cat([x[:1], *(o[1] for o in others), x[1:]])
            docs.append([doc, *(o[0] for o in others), doc])
        else:
            doc, x = corpus.sample(rng, n, T)
            docs.append([doc] * n)
        contexts.append(x)  # [n, T]
        kept.append(torch.stack([kept_rows(L, N, K, torch.Generator().manual_seed(rng.getrandbits(63)),
                                           model.config.drop_memory_per_layer) for _ in range(n - 1)]))  # [n-1, L, N-K]
        reset.append(rng.random() < cfg.memory_reset_prob)
    return CorpusBatch(objective, micro_step, torch.stack(contexts), layout.grad, torch.stack(kept, dim=1), reset,
                       torch.tensor(docs, dtype=torch.long), plain=not layout.inject)


@dataclass
class RowMemories:
    """Each batch row's memory between micro-steps (this process's rows): the pool [B, L, N, d], the
    document that wrote each pool row [B, L, N] (-1: the initial pool), and M+ the long-term memory
    and the pool rows' ages [B, L, N]."""

    pools: torch.Tensor
    docs: torch.Tensor
    ltm: RowLTM | None = None
    stm_ages: torch.Tensor | None = None

    @classmethod
    def fresh(cls, initial: torch.Tensor, batch: int, ltm: bool) -> RowMemories:
        pools = initial.unsqueeze(0).repeat(batch, 1, 1, 1)
        docs = torch.full(pools.shape[:3], -1, dtype=torch.long, device=pools.device)
        if not ltm:
            return cls(pools, docs)
        return cls(pools, docs, RowLTM.empty(pools), torch.zeros(pools.shape[:3], dtype=torch.long, device=pools.device))

    def reset(self, rows: list[bool], initial: torch.Tensor) -> None:
        """The short-term memory of the flagged rows restarts; the long-term one keeps its (now unrelated) rows."""
        for b, reset in enumerate(rows):
            if reset:
                self.pools[b] = initial
                self.docs[b] = -1
                if self.stm_ages is not None:
                    self.stm_ages[b] = 0

    def save(self, path: Path, rank: int) -> None:
        torch.save(self.pools.cpu(), path / f"pools_rank{rank}.pt")
        torch.save(self.docs.cpu(), path / f"pool_docs_rank{rank}.pt")
        if self.ltm is not None:
            torch.save({"vectors": self.ltm.vectors.cpu(), "ages": self.ltm.ages.cpu(), "docs": self.ltm.docs.cpu(),
                        "stm_ages": self.stm_ages.cpu()}, path / f"ltm_rank{rank}.pt")

    def load(self, path: Path, rank: int, device: torch.device) -> None:
        self.pools = torch.load(path / f"pools_rank{rank}.pt", map_location=device)
        if (path / f"pool_docs_rank{rank}.pt").is_file():
            self.docs = torch.load(path / f"pool_docs_rank{rank}.pt", map_location=device)
        if self.ltm is not None and (path / f"ltm_rank{rank}.pt").is_file():
            saved = torch.load(path / f"ltm_rank{rank}.pt", map_location=device)
            self.ltm, self.stm_ages = RowLTM(saved["vectors"], saved["ages"], saved["docs"]), saved["stm_ages"]


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
                if hasattr(hf_compat.attention(layer), name):
                    getattr(hf_compat.attention(layer), name).requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def set_dropout(model: nn.Module, p: float) -> None:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = p
    lm_config = model.lm.config if isinstance(model, MemoryModel) else None
    if lm_config is not None and hasattr(lm_config, "attention_dropout"):
        lm_config.attention_dropout = p  # read by the attention layers at every call


# ---- the run -------------------------------------------------------------------------------------------


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train; returns the step reached, mean losses per objective of the last log window, whether
    `max_minutes` stopped the run, the data hash of this process's rows, and paths.

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
    if model.tokenizer is None:
        raise ValueError(f"{cfg.model} has no tokenizer: training needs one to read the text")
    model.to(acc.device)
    if cfg.dropout is not None:
        set_dropout(model, cfg.dropout)
    corpus = TokenCorpus.from_texts(read_documents(cfg.data, cfg.split_blank_lines, max_documents=cfg.max_documents),
                                    model.tokenizer)
    params = trainable_parameters(model, cfg.train)
    N = model.config.num_memory_tokens
    module = MemoryTraining(model, cfg.gradient_checkpointing, cfg.retriever_weight,
                            N if cfg.ltm_rows < 0 else cfg.ltm_rows).train()
    optimizer, scheduler = make_optimizer(params, cfg.lr, cfg.steps, cfg.warmup_steps, cfg.weight_decay)
    module, optimizer, scheduler = acc.prepare(module, optimizer, scheduler)
    sharded = acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    if cfg.ema and sharded:
        raise ValueError("ema needs whole parameters on every process: not with FSDP / DeepSpeed")
    ema = EMA(model, cfg.ema) if cfg.ema else None

    B, rank = cfg.batch_size, acc.process_index
    rows = range(rank * B, (rank + 1) * B)  # global row indices of this process
    initial = model.initial_pool.detach()  # [L, N, d]
    memories = RowMemories.fresh(initial, B, ltm=mplus and cfg.ltm_rows != 0)
    step, data = 0, DataHash()
    state_dir = out / "state"
    if cfg.resume and (state_dir / "latest").is_file():
        last = state_dir / (state_dir / "latest").read_text().strip()
        acc.load_state(str(last))
        saved = json.loads((last / "trainer.json").read_text())
        step, data = saved["step"], DataHash(saved.get("data_hash", ""))
        memories.load(last, rank, acc.device)
        if ema is not None:
            ema.model.load_state_dict(torch.load(last / "ema.pt", map_location=acc.device))

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

    def next_batch(step: int, micro: int) -> CorpusBatch:
        return make_batch(cfg, corpus, model, step * cfg.grad_accum + micro, rows)

    def loss(batch: CorpusBatch) -> torch.Tensor:
        torch.manual_seed(hash((cfg.seed, batch.micro_step, rank)) % (1 << 62))  # dropout: reproducible on resume
        memories.reset(batch.reset, initial)
        value, pools, info = module(batch.contexts.to(acc.device), memories.pools, batch.grad,
                                    batch.kept.to(acc.device), plain=batch.plain,
                                    docs=batch.docs.to(acc.device), pool_docs=memories.docs, ltm=memories.ltm,
                                    stm_ages=memories.stm_ages)
        memories.pools, memories.docs = pools, info["pool_docs"]
        memories.ltm, memories.stm_ages = info.get("ltm", memories.ltm), info.get("stm_ages", memories.stm_ages)
        window.setdefault(batch.objective, []).append(acc.reduce(info["lm_loss"], "mean").item())
        if mplus:  # sums over every process (each may have a different number of scored pairs)
            for key in retr_window:
                stats = info.get(key, torch.zeros(6, dtype=torch.float64)).to(acc.device)
                retr_window[key] += acc.reduce(stats, "sum").cpu()
        return value

    def log(step: int) -> None:
        nonlocal window, retr_window, last_log
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

    def on_step(step: int, _loss: float) -> None:
        if step % cfg.log_every == 0 or step == end:
            log(step)
        if bar is not None:
            bar.update(1)
        if step % cfg.save_every == 0 or step == end:
            save_state(acc, state_dir, step, memories, data, ema)

    result = fit(acc, module, optimizer, scheduler, params, next_batch, loss, end=end, start=step,
                 grad_accum=cfg.grad_accum, max_grad_norm=cfg.max_grad_norm, max_minutes=cfg.max_minutes, data=data,
                 ema=ema, ema_source=model, on_step=on_step)
    step, capped = result.step, result.capped_by_minutes
    if capped and window:  # stopped early by the cap: the last log line and the state at that step
        log(step)
    if capped and step % cfg.save_every:
        save_state(acc, state_dir, step, memories, data, ema)
    if bar is not None:
        bar.close()

    summary: dict[str, Any] = {"step": step, "losses": last_log, "state": str(state_dir),
                               "capped_by_minutes": capped, "data_sha256": data.hexdigest()}
    acc.wait_for_everyone()
    unwrapped: MemoryModel = acc.unwrap_model(module).model
    if cfg.dump_params:
        from safetensors.torch import save_file

        save_file({n: p.detach().cpu().contiguous() for n, p in unwrapped.named_parameters() if p.requires_grad},
                  out / f"params_rank{rank}.safetensors")
    finished = step >= cfg.steps or capped
    # FSDP / DeepSpeed hold shards: gather every parameter (a collective: all ranks) into a fresh copy
    state = acc.get_state_dict(module) if sharded and finished else None
    if finished and acc.is_main_process:
        trained = model_from_state(cfg.model, state) if sharded else (ema.model if ema is not None else unwrapped)
        with torch.no_grad():  # the memory of row 0 becomes the checkpoint's trained initial pool
            trained.initial_pool.copy_(memories.pools[0])
        trained.initialized = True
        if mplus:
            refresh_ltm_keys(trained)
        ckpt.save(trained, out / "model")
        summary["model"] = str(out / "model")
    acc.wait_for_everyone()
    acc.end_training()
    return summary


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


def save_state(acc, state_dir: Path, step: int, memories: RowMemories, data: DataHash, ema: EMA | None = None) -> None:
    """Resumable state: accelerate's (model, optimizer, scheduler, RNG), each rank's memories, the EMA
    weights, the step and the data hash. `latest` is written last, so an interrupted save leaves the
    previous state in force."""
    path = state_dir / f"step_{step:08d}"
    acc.save_state(str(path))
    memories.save(path, acc.process_index)
    acc.wait_for_everyone()
    if acc.is_main_process:
        if ema is not None:  # the same on every process
            torch.save(ema.model.state_dict(), path / "ema.pt")
        (path / "trainer.json").write_text(json.dumps({"step": step, "data_hash": data.state}))
        (state_dir / "latest").write_text(path.name)
        for old in sorted(state_dir.glob("step_*"))[:-2]:  # keep the last two
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()


# ---- measuring -----------------------------------------------------------------------------------


def seeded_kept(model: MemoryModel, seed: int) -> torch.Tensor:
    """Surviving rows [L, N - K] of one injection, a function of `seed` alone."""
    L, N, K = model.num_layers, model.config.num_memory_tokens, model.config.num_tokens
    return kept_rows(L, N, K, torch.Generator().manual_seed(seed)).to(model.initial_pool.device)


@torch.no_grad()
def new_knowledge_loss(model: MemoryModel, contexts: torch.Tensor, seed: int = 0) -> float:
    """The new-knowledge objective measured: mean loss of x2 read from a fresh memory after injecting
    x1; contexts [D, 2, T]."""
    D = contexts.shape[0]
    pool = model.initial_pool.detach().unsqueeze(0).repeat(D, 1, 1, 1)
    kept = torch.stack([seeded_kept(model, seed + i) for i in range(D)])  # [D, L, N-K]
    pool = write_pool(pool, delta_memory(model, pool, contexts[:, 0]), kept)
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
    kept = torch.stack([torch.stack([seeded_kept(model, seed + 1000 * s + i) for i in range(D)])
                        for s in range(n - 1)])  # [n-1, D, L, N-K]
    module = MemoryTraining(model)
    _, _, info = module(ids.to(model.device), pool, [False] * (n - 1), kept, docs=docs, pool_docs=pool_docs,
                        ltm=RowLTM.empty(pool), stm_ages=torch.zeros(pool.shape[:3], dtype=torch.long))
    return retriever_record({"retriever": info["retriever"], "encoder": torch.zeros(6, dtype=torch.float64)})
