"""Teach a memory model to use its memory (SPEC §5, MemoryLLM §3.2).

    python -m memllm.train --model ckpt/ --data corpus.jsonl --out runs/a --steps 1000
    accelerate launch --num_processes 8 -m memllm.train --model ckpt/ --data corpus.jsonl --out runs/a

Every batch row carries its own memory pool (`pools` [B, L, N, d]): it starts as the checkpoint's
initial pool and keeps every injection of the steps before (detached between steps, reset now and
then), so the model always writes into and reads from a realistic, full memory. Each micro-step
draws one objective by the configured shares:

1. new knowledge: inject x1, predict x2 from memory; the loss backpropagates through the injection;
2. continuous context: inject x1..x(n-1) in turn, predict xn; gradient through the last k injections;
3. forgetting: inject x1 of document A, then distractor contexts of other documents, predict A's x2;
4. plain LM: the full text read against the memory, no injection (keeps the base ability).

Determinism: the objective, the windows, the memory resets and the dropped memory rows of a
micro-step are functions of (seed, micro-step, global row), so a resumed run and a run on any number
of processes (same global batch) train the same way. Dropout is the exception: set `dropout=0` for
bit-for-bit agreement across process counts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from memllm.data import TokenCorpus, read_documents
from memllm.inject import delta_memory
from memllm.model import MemoryModel

OBJECTIVES = ("new_knowledge", "continuous", "forgetting", "plain_lm")


@dataclass
class TrainConfig:
    """One training run. Batch size is per process and micro-step: the global batch of one optimizer
    step is batch_size * processes * grad_accum."""

    model: str  # a memllm checkpoint directory (e.g. from `memllm init`)
    data: list[str]  # .txt / .jsonl files or folders, or `datasets` names
    out: str  # output directory: metrics.jsonl, state/ (resume), model/ (the trained checkpoint)
    steps: int = 1000  # optimizer steps
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"  # "no", "bf16" or "fp16"
    gradient_checkpointing: bool = False  # recompute each injection / read in the backward pass
    seed: int = 0
    # objective shares (normalised)
    new_knowledge: float = 0.4
    continuous: float = 0.3
    forgetting: float = 0.2
    plain_lm: float = 0.1
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
    max_documents: int | None = None
    log_every: int = 10
    save_every: int = 500  # resumable state every this many steps (and at the end)
    resume: bool = True  # continue from out/state if present
    stop_after: int | None = None  # stop (after saving state) at this step: preemption, tests
    dump_params: bool = False  # write each rank's trained parameters to out/params_rank{r}.safetensors
    progress: bool = True

    def shares(self) -> dict[str, float]:
        shares = {name: getattr(self, name) for name in OBJECTIVES}
        if min(shares.values()) < 0 or sum(shares.values()) <= 0:
            raise ValueError(f"objective shares must be >= 0 and not all 0, got {shares}")
        return shares

    @classmethod
    def from_args(cls, argv: list[str] | None = None) -> TrainConfig:
        """Parse `--field value` for every field (`--no-flag` for booleans)."""
        parser = argparse.ArgumentParser(prog="memllm.train", description=__doc__.split("\n")[0])
        add_arguments(parser)
        return cls.from_namespace(parser.parse_args(argv))

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in vars(ns).items() if k in names and v is not None})


def add_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """One option per TrainConfig field, so the CLI and the config never drift apart."""
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = None if f.default is dataclasses.MISSING else f.default
        required = required and f.default is dataclasses.MISSING
        if f.name == "data":
            parser.add_argument(flag, nargs="+", required=required)
        elif isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        elif f.name in ("dropout",):
            parser.add_argument(flag, type=float, default=None)
        elif f.name in ("stop_after", "max_documents"):
            parser.add_argument(flag, type=int, default=None)
        elif f.name == "mixed_precision":
            parser.add_argument(flag, choices=["no", "bf16", "fp16"], default=None)
        elif f.name == "train":
            parser.add_argument(flag, choices=["lora", "full"], default=None)
        else:
            parser.add_argument(flag, type=type(default) if default is not None else str, required=required,
                                default=None)


# ---- reading and writing per-row memories --------------------------------------------------------


def read(model: MemoryModel, pool: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor | None = None):
    """Forward of input_ids [B, T] with row b reading memory pool[b] ([B, L, N, d]), differentiable."""
    return model.forward_pools(input_ids, pool, labels=labels)


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


class MemoryTraining(nn.Module):
    """The whole training computation of one micro-step as one module forward: injections, the
    prediction and its loss. One forward per backward is what DDP / FSDP wrappers expect."""

    def __init__(self, model: MemoryModel, gradient_checkpointing: bool = False) -> None:
        super().__init__()
        self.model = model
        self.gradient_checkpointing = gradient_checkpointing

    def forward(
        self,
        contexts: torch.Tensor,  # [B, n, T]: contexts 0..n-2 are injected, n-1 is predicted
        pool: torch.Tensor,  # [B, L, N, d], detached
        grad: list[bool],  # per injected context: does the gradient flow through its injection
        kept: torch.Tensor,  # [n-1, B, L, N-K] rows surviving each injection
        plain: bool = False,  # plain LM: no injection, predict all contexts as one text
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, pool after the injections, detached)."""
        model = self.model
        B, n, T = contexts.shape
        if plain:
            text = contexts.reshape(B, n * T)
            return self._read(pool, text), pool
        for i in range(n - 1):
            ids = contexts[:, i]
            if grad[i]:
                delta = self._inject(pool, ids)  # [B, L, K, d]
            else:
                with torch.no_grad():
                    delta = delta_memory(model, pool.detach(), ids)
            pool = write(pool, delta, kept[i])
        return self._read(pool, contexts[:, -1]), pool.detach()

    def _inject(self, pool: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(delta_memory, self.model, pool, ids, use_reentrant=False)
        return delta_memory(self.model, pool, ids)

    def _read(self, pool: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        def loss(pool: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
            return read(self.model, pool, ids, labels=ids).loss

        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(loss, pool, ids, use_reentrant=False)
        return loss(pool, ids)


# ---- batches ---------------------------------------------------------------------------------------


@dataclass
class MicroBatch:
    objective: str
    contexts: torch.Tensor  # [B, n, T]
    grad: list[bool]  # per injection
    kept: torch.Tensor  # [n-1, B, L, N-K]
    reset: list[bool]  # per row: restart this row's memory from the initial pool first


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
    contexts, kept, reset = [], [], []
    for g in rows:
        rng = random.Random(f"row:{cfg.seed}:{micro_step}:{g}")
        if objective == "forgetting":
            doc, x = corpus.sample(rng, 2, T)
            others = [corpus.sample(rng, 1, T, exclude=doc)[1] for _ in range(cfg.num_distractors)]
            x = torch.cat([x[:1], *others, x[1:]])
        else:
            x = corpus.sample(rng, n, T)[1]
        contexts.append(x)  # [n, T]
        kept.append(torch.stack([kept_rows(L, N, K, rng.getrandbits(63), model.config.drop_memory_per_layer, x.device)
                                 for _ in range(n - 1)]))  # [n-1, L, N-K]
        reset.append(rng.random() < cfg.memory_reset_prob)
    return MicroBatch(objective, torch.stack(contexts), grad, torch.stack(kept, dim=1), reset)


# ---- what is trained -------------------------------------------------------------------------------


def trainable_parameters(model: MemoryModel, what: str) -> list[nn.Parameter]:
    """Set requires_grad: LoRA adapters (both) or everything, plus the bos and positional vectors."""
    if what not in ("lora", "full"):
        raise ValueError(f"train must be 'lora' or 'full', got {what!r}")
    if what == "lora" and model.config.lora_config is None:
        raise ValueError("train='lora' but the model has no LoRA adapters: use train='full' or a LoRA checkpoint")
    for name, p in model.named_parameters():
        p.requires_grad_(what == "full" or "lora_" in name)
    model.bos_embedding.requires_grad_(True)
    model.new_memory_positional_emb.requires_grad_(True)
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
    """Train; returns the final step, mean losses per objective of the last log window and paths."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    from memllm import checkpoint as ckpt

    out = Path(cfg.out)
    acc = Accelerator(
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.grad_accum,
        step_scheduler_with_optimizer=False,  # we step it once per optimizer step, whatever the process count
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],  # objectives use different parts
    )
    torch.manual_seed(cfg.seed)
    model = ckpt.load(cfg.model, dtype=torch.float32, load_tokenizer=True)
    if model.config.kind != "memoryllm":
        raise ValueError("training M+ (retriever loss, long-term memory) is not implemented; MemoryLLM only")
    if model.tokenizer is None:
        raise ValueError(f"{cfg.model} has no tokenizer: training needs one to read the text")
    model.to(acc.device)
    if cfg.dropout is not None:
        set_dropout(model, cfg.dropout)
    corpus = TokenCorpus.from_texts(read_documents(cfg.data, cfg.split_blank_lines, max_documents=cfg.max_documents),
                                    model.tokenizer)
    params = trainable_parameters(model, cfg.train)
    module = MemoryTraining(model, cfg.gradient_checkpointing).train()
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
    step = 0
    state_dir = out / "state"
    if cfg.resume and (state_dir / "latest").is_file():
        last = state_dir / (state_dir / "latest").read_text().strip()
        acc.load_state(str(last))
        step = json.loads((last / "trainer.json").read_text())["step"]
        pools = torch.load(last / f"pools_rank{rank}.pt", map_location=acc.device)

    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    bar = None
    if cfg.progress and acc.is_local_main_process:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=step, desc="train", dynamic_ncols=True)
    window: dict[str, list[float]] = {}
    last_log: dict[str, float] = {}
    t0 = time.perf_counter()
    end = cfg.steps if cfg.stop_after is None else min(cfg.steps, cfg.stop_after)
    while step < end:
        for micro in range(cfg.grad_accum):
            m = step * cfg.grad_accum + micro
            batch = make_batch(cfg, corpus, model, m, rows)
            torch.manual_seed(hash((cfg.seed, m, rank)) % (1 << 62))  # dropout: reproducible on resume
            for b, reset in enumerate(batch.reset):
                if reset:
                    pools[b] = initial
            with acc.accumulate(module):
                loss, pools = module(batch.contexts.to(acc.device), pools, batch.grad, batch.kept.to(acc.device),
                                     plain=batch.objective == "plain_lm")
                acc.backward(loss)
                if acc.sync_gradients and cfg.max_grad_norm:
                    acc.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            pools = pools.detach()
            window.setdefault(batch.objective, []).append(acc.reduce(loss.detach(), "mean").item())
        scheduler.step()
        step += 1
        if step % cfg.log_every == 0 or step == end:
            last_log = {k: sum(v) / len(v) for k, v in window.items()}
            record = {"step": step, "lr": scheduler.get_last_lr()[0], "time_s": round(time.perf_counter() - t0, 3),
                      **{f"loss/{k}": v for k, v in last_log.items()}}
            if acc.is_main_process:
                with open(out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
            if bar is not None:
                bar.set_postfix({k[:6]: f"{v:.3f}" for k, v in last_log.items()})
            window = {}
        if bar is not None:
            bar.update(1)
        if step % cfg.save_every == 0 or step == end:
            save_state(acc, state_dir, step, pools)
    if bar is not None:
        bar.close()

    result: dict[str, Any] = {"step": step, "losses": last_log, "state": str(state_dir)}
    acc.wait_for_everyone()
    unwrapped: MemoryModel = acc.unwrap_model(module).model
    if cfg.dump_params:
        from safetensors.torch import save_file

        save_file({n: p.detach().cpu().contiguous() for n, p in unwrapped.named_parameters() if p.requires_grad},
                  out / f"params_rank{rank}.safetensors")
    if step >= cfg.steps and acc.is_main_process:
        with torch.no_grad():  # the memory of row 0 becomes the checkpoint's trained initial pool
            unwrapped.initial_pool.copy_(pools[0])
        unwrapped.initialized = True
        ckpt.save(unwrapped, out / "model")
        result["model"] = str(out / "model")
    acc.wait_for_everyone()
    acc.end_training()
    return result


def save_state(acc, state_dir: Path, step: int, pools: torch.Tensor) -> None:
    """Resumable state: accelerate's (model, optimizer, scheduler, RNG), each rank's memories, the step.
    `latest` is written last, so an interrupted save leaves the previous state in force."""
    path = state_dir / f"step_{step:08d}"
    acc.save_state(str(path))
    torch.save(pools.cpu(), path / f"pools_rank{acc.process_index}.pt")
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


def bench_train_step(
    model: MemoryModel | None = None, batch_size: int = 4, context_len: int = 256, repeats: int = 5
) -> dict[str, float]:
    """Seconds of one new-knowledge training step (inject x1 with gradient, predict x2 from memory,
    backward) against one plain LM step (forward + backward, no memory) on the same 2T tokens."""
    if model is None:
        from memllm.tiny import random_model

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
        loss, _ = module(contexts, pool, [True], kept)
        loss.backward()

    def lm_step() -> None:
        with model.adapter("decoder"):
            ids = contexts.reshape(batch_size, -1)
            model.lm(input_ids=ids, labels=ids).loss.backward()

    def timed(fn) -> float:
        fn()  # warm-up
        times = []
        for _ in range(repeats):
            model.zero_grad(set_to_none=True)
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return sorted(times)[len(times) // 2]

    lm_s, mem_s = timed(lm_step), timed(memory_step)
    return {"batch_size": batch_size, "context_len": context_len, "memory_vectors": N, "written_per_injection": K,
            "lm_step_s": lm_s, "memory_step_s": mem_s, "memory_step_over_lm_step": mem_s / lm_s}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="memllm.train", description="Train a memory model to use its memory.")
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
