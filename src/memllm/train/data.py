"""Training data: documents in, fixed-length token windows out; and the batch types of the objectives.

Documents come from .txt files (one per file, or several separated by blank lines with
`split_blank_lines`), .jsonl files (field "text") or a Hugging Face `datasets` source, a hub name or
a local folder of parquet files (streamed, first `max_documents`). They are tokenised with the model's
own tokenizer and laid end to end in one token stream, separated by the tokenizer's EOS token,
remembering where each document starts.

The training objectives need, per batch row, n consecutive contexts of `length` tokens from one
document (x1..xn) and sometimes contexts from other documents (distractors). Every window starts inside
its document (at a random offset when the document is long enough, else at its start and running on
into the next documents), so all windows have the same length and batches need no padding.
Everything is drawn from a `random.Random` the caller seeds: the same seed gives the same windows on
any machine and any number of processes.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch


def read_documents(
    paths: Sequence[str | Path],
    split_blank_lines: bool = False,
    text_field: str = "text",
    max_documents: int | None = None,
) -> list[str]:
    """Documents from .txt / .jsonl files, folders of them, or `datasets` sources: a hub name ("name" or
    "name:config") or a folder of parquet / arrow / csv files (split "train", streamed)."""
    docs: list[str] = []
    for source in paths:
        path = Path(source)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl"))
            if files:
                docs += read_documents(files, split_blank_lines, text_field, None)
            else:  # a saved / downloaded dataset (parquet, arrow, ...): through `datasets`, streamed
                docs += _dataset_documents(str(source), text_field, max_documents)
        elif path.suffix == ".jsonl":
            with open(path) as f:
                for i, line in enumerate(f):
                    if not line.strip():
                        continue
                    record = json.loads(line)
                    if text_field not in record:
                        raise ValueError(f"{path}:{i + 1} has no field {text_field!r}")
                    docs.append(record[text_field])
        elif path.suffix == ".txt" or path.is_file():
            text = path.read_text()
            docs += [p for p in text.split("\n\n")] if split_blank_lines else [text]
        else:
            docs += _dataset_documents(str(source), text_field, max_documents)
    docs = [d.strip() for d in docs if d.strip()]
    if not docs:
        raise ValueError(f"no documents found in {', '.join(map(str, paths))}")
    return docs[:max_documents] if max_documents else docs


def _dataset_documents(name: str, text_field: str, max_documents: int | None) -> list[str]:
    """The first documents of a Hugging Face dataset, streamed (so a 10 TB corpus costs nothing)."""
    try:
        import datasets
    except ImportError as e:
        raise ValueError(f"{name} is not a file, and the `datasets` package for dataset names is not installed") from e
    dataset, _, config = name.partition(":")
    stream = datasets.load_dataset(dataset, config or None, split="train", streaming=True)
    limit = max_documents or 100_000
    out = []
    for record in stream:
        if text_field not in record:
            raise ValueError(f"{name}: records have no field {text_field!r} (fields: {', '.join(record)})")
        out.append(record[text_field])
        if len(out) >= limit:
            break
    return out


@dataclass
class TokenCorpus:
    """All documents as one token stream [S] with each document's start offset."""

    tokens: torch.Tensor  # [S] int64
    starts: list[int]  # start of each document in `tokens`, ascending

    @classmethod
    def from_texts(cls, texts: Iterable[str], tokenizer) -> TokenCorpus:
        """Tokenise with the model's tokenizer; documents are separated by its EOS token (if any)."""
        eos = getattr(tokenizer, "eos_token_id", None)
        pieces: list[int] = []
        starts: list[int] = []
        for text in texts:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if not ids:
                continue
            starts.append(len(pieces))
            pieces += ids + ([eos] if eos is not None else [])
        return cls(torch.tensor(pieces, dtype=torch.long), starts)

    def __len__(self) -> int:
        return len(self.starts)

    def doc_length(self, i: int) -> int:
        end = self.starts[i + 1] if i + 1 < len(self.starts) else self.tokens.numel()
        return end - self.starts[i]

    def window(self, doc: int, total: int, rng: random.Random) -> torch.Tensor:
        """`total` consecutive tokens [total] starting in document `doc`."""
        S = self.tokens.numel()
        if total > S:
            raise ValueError(f"the corpus has {S} tokens, fewer than the {total} one training example needs")
        start = self.starts[doc]
        slack = self.doc_length(doc) - total
        start += rng.randint(0, slack) if slack > 0 else 0
        start = min(start, S - total)  # the last documents run into the end of the stream: step back
        return self.tokens[start : start + total]

    def sample(self, rng: random.Random, num_contexts: int, length: int, exclude: int | None = None) -> tuple[int, torch.Tensor]:
        """(document index, contexts [num_contexts, length]) of one document, x1..xn in order."""
        doc = rng.randrange(len(self))
        if exclude is not None and len(self) > 1:
            while doc == exclude:
                doc = rng.randrange(len(self))
        return doc, self.window(doc, num_contexts * length, rng).view(num_contexts, length)


# ---- batches ---------------------------------------------------------------------------------------
# What one micro-step trains on. `tensors()` names what identifies the data, for the run's data hash.


@dataclass
class CorpusBatch:
    """A corpus objective's micro-batch (`memllm train`): n contexts per row from the token corpus."""

    objective: str  # new_knowledge | continuous | forgetting | plain_lm
    micro_step: int
    contexts: torch.Tensor  # [B, n, T]: contexts 0..n-2 are injected, n-1 is predicted
    grad: list[bool]  # per injection: does the gradient flow through it
    kept: torch.Tensor  # [n-1, B, L, N-K] rows surviving each injection
    reset: list[bool]  # per row: restart this row's memory from the initial pool first
    docs: torch.Tensor  # [B, n] corpus document of each context (where its window starts)
    plain: bool = False  # no injection: the n contexts are read as one text against the memory

    def tensors(self) -> list[torch.Tensor]:
        return [self.contexts, self.kept, self.docs, torch.tensor(self.reset)]


@dataclass
class ContextBatch:
    """In-context QA rows: <bos> context question answer, right-padded."""

    ids: torch.Tensor  # [B, T]
    answer_pos: torch.Tensor  # [B] position whose logits predict the answer
    answers: torch.Tensor  # [B]
    context_len: torch.Tensor  # [B] tokens of <bos> + context (the LM loss is on them)

    def tensors(self) -> list[torch.Tensor]:
        return [self.ids, self.answer_pos, self.context_len]


@dataclass
class LookupBatch:
    """In-context lookup rows: <bos> texts, then several questions (and recalls: a text's words up to a
    value), each followed by its answer; right-padded. Every target is -100 where there is none."""

    ids: torch.Tensor  # [B, T]
    lm_targets: torch.Tensor  # [B, T] the next token, on the texts only (the LM loss)
    answers: torch.Tensor  # [B, T] the answer token at the positions that predict one
    subjects: torch.Tensor  # [B, T, 2] first and last token of the name of whom the text or question is about

    def tensors(self) -> list[torch.Tensor]:
        return [self.ids, self.lm_targets, self.answers, self.subjects]


@dataclass
class MemoryBatch:
    """Memory QA rows: texts written into per-row memories one injection at a time, then a question."""

    texts: list[list[list[int]]]  # n_texts injections, each B token lists (no <bos>, as `model.inject` encodes)
    target: int  # index of the injection holding the asked person's biography (the same in every row)
    strangers: torch.Tensor  # [B] bool: the row asks about someone not in memory
    questions: torch.Tensor  # [B, T] prompt + answer, right-padded
    labels: torch.Tensor  # [B, T] -100 except the answer token
    kept: list[torch.Tensor]  # per injection [B, L, N - K] surviving rows
    target_subjects: torch.Tensor | None = None  # [B, K, 2] subject labels of the target's K memory rows, -100: none

    def tensors(self) -> list[torch.Tensor]:
        return [self.questions, self.labels, *(pad(rows, 0) for rows in self.texts), *self.kept]


def pad(rows: list[list[int]], value: int) -> torch.Tensor:
    """Token lists, right-padded with `value` into one tensor [len(rows), longest]."""
    T = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (T - len(r)) for r in rows], dtype=torch.long)
