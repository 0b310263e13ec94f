"""Reading from memory: generation through transformers' own `generate`.

The memory prefix enters as a prefilled key/value cache (computed once per memory state, see
`MemoryModel.memory_prefix`); the attention mask covers [prefix ; prompt], so transformers derives
position ids that start every row's first real token at P. Greedy, sampling, stop tokens, logits
processors and streamers all work as they do for any transformers model. Left-padded batches are
correct (the authors' code crashes on padding).

Inference only: no autograd graph (no_grad), and prompts plus `max_new_tokens` must fit the model's
positions after the memory prefix (ValueError naming the limit otherwise).
"""

from __future__ import annotations

import contextvars
import threading
from typing import TYPE_CHECKING, Iterator

import torch
from transformers import TextIteratorStreamer

from memllm.core.memory import Memory

if TYPE_CHECKING:
    from memllm.core.model import MemoryModel


def generate(
    model: "MemoryModel",
    memory: Memory,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    **generate_kwargs,
):
    """transformers' `generate` on a prompt [B, T] read against a memory (decoder adapter).

    Returns what `generate` returns: sequences [B, T + new] (prompt included), or a
    GenerateOutput when `return_dict_in_generate=True`.
    """
    new_tokens = generate_kwargs.get("max_new_tokens")
    with torch.no_grad(), model.adapter("decoder"):
        # checks the ids and the prompt's length; a preallocated cache when the answer's length is known
        inputs = model.prepare(memory, input_ids, attention_mask, new_tokens)
        model.check_room(memory, input_ids.shape[-1], new_tokens)
        inputs.pop("position_ids")  # generate derives the same ones from the [prefix ; prompt] mask
        _generate_defaults(model, generate_kwargs)
        with model.reading(memory, inputs):
            return model.lm.generate(**inputs, **generate_kwargs)


def _generate_defaults(model: "MemoryModel", generate_kwargs: dict) -> None:
    """The pad token, and no automatic torch.compile: transformers compiles the forward on GPUs
    whenever the cache is a static one, which memllm's hooks (M+ retrieval) have not been checked
    under; `disable_compile=False` asks for it."""
    generate_kwargs.setdefault("pad_token_id", _pad_id(model))
    generate_kwargs.setdefault("disable_compile", True)


def _pad_id(model: "MemoryModel") -> int | None:
    tok = model.tokenizer
    if tok is not None and tok.pad_token_id is not None:
        return tok.pad_token_id
    eos = model.lm.generation_config.eos_token_id
    return eos[0] if isinstance(eos, list) else eos


def encode_prompt(model: "MemoryModel", prompts: str | list[str], chat: bool | None = None) -> dict:
    """Tokenize questions (left-padded as a batch). Chat models get their chat template
    (`chat=None`: whenever the tokenizer has one)."""
    batch = [prompts] if isinstance(prompts, str) else list(prompts)
    if not batch or any(not p.strip() for p in batch):
        raise ValueError("the question is empty")
    with model.using_tokenizer() as tok:
        use_chat = chat if chat is not None else bool(getattr(tok, "chat_template", None))
        if use_chat:
            batch = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                             add_generation_prompt=True) for p in batch]
        # The published models read questions without a BOS token (the authors' examples).
        enc = tok(batch, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    return {"input_ids": enc["input_ids"].to(model.device), "attention_mask": enc["attention_mask"].to(model.device)}


def ask(
    model: "MemoryModel",
    memory: Memory,
    question: str | list[str],
    max_new_tokens: int = 32,
    chat: bool | None = None,
    **generate_kwargs,
) -> str | list[str]:
    """Answer a question (or a batch) from memory; returns only the new text."""
    enc = encode_prompt(model, question, chat)
    model.check_room(memory, enc["input_ids"].shape[1], max_new_tokens, "question")
    generate_kwargs.setdefault("do_sample", False)
    out = generate(model, memory, max_new_tokens=max_new_tokens, **enc, **generate_kwargs)
    new = out[:, enc["input_ids"].shape[1]:]
    with model.using_tokenizer() as tok:
        answers = tok.batch_decode(new, skip_special_tokens=True)
    return answers[0] if isinstance(question, str) else answers


def stream(
    model: "MemoryModel",
    memory: Memory,
    question: str,
    max_new_tokens: int = 128,
    chat: bool | None = None,
    **generate_kwargs,
) -> Iterator[str]:
    """The answer's text, yielded as it is generated. Generation runs in a background thread, in a
    copy of the caller's context (so hooks the caller installed follow it); bad input is refused
    here, before the first piece is asked for."""
    model.check_memory(memory)
    enc = encode_prompt(model, question, chat)
    model.check_room(memory, enc["input_ids"].shape[1], max_new_tokens, "question")
    streamer = TextIteratorStreamer(model.tokenizer, skip_prompt=True, skip_special_tokens=True)
    generate_kwargs.setdefault("do_sample", False)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            generate(model, memory, max_new_tokens=max_new_tokens, streamer=streamer, **enc, **generate_kwargs)
        except BaseException as e:  # surfaced in the caller's thread below
            errors.append(e)
            streamer.end()

    thread = threading.Thread(target=contextvars.copy_context().run, args=(run,), daemon=True)
    thread.start()
    return _pieces(streamer, thread, errors)


def _pieces(streamer: TextIteratorStreamer, thread: threading.Thread, errors: list[BaseException]) -> Iterator[str]:
    yield from streamer
    thread.join()
    if errors:
        raise errors[0]


def ask_many(
    model: "MemoryModel",
    memories: list[Memory],
    questions: list[str],
    max_new_tokens: int = 32,
    chat: bool | None = None,
    **generate_kwargs,
) -> list[str]:
    """Answer questions[i] from memories[i], all in one batched generation (a server's many users).

    Rows read different memories: each row's prefix cache holds its own memory's keys and values
    (computed once per memory state, as for `ask`). MemoryLLM only when the memories differ: M+
    retrieves from one long-term memory per forward, so its rows are grouped by memory instead.
    Equal to asking each memory its questions separately (greedy decoding; tested)."""
    if len(memories) != len(questions):
        raise ValueError(f"{len(questions)} questions for {len(memories)} memories: give one memory per question")
    distinct = {id(m): m for m in memories}
    if len(distinct) == 1 or model.config.kind != "memoryllm" or not all(m.initialized for m in distinct.values()):
        answers: list[str] = [""] * len(questions)
        for key, memory in distinct.items():
            rows = [i for i, m in enumerate(memories) if id(m) == key]
            for i, a in zip(rows, ask(model, memory, [questions[i] for i in rows], max_new_tokens, chat,
                                      **generate_kwargs)):
                answers[i] = a
        return answers
    for memory in distinct.values():
        model.check_memory(memory)
    enc = encode_prompt(model, questions, chat)
    model.check_room(memories[0], enc["input_ids"].shape[1], max_new_tokens, "question")
    model.check_token_ids(enc["input_ids"])
    generate_kwargs.setdefault("do_sample", False)
    _generate_defaults(model, generate_kwargs)
    with torch.no_grad(), model.adapter("decoder"):
        prefixes = {key: model.memory_prefix(memory) for key, memory in distinct.items()}
        P = next(iter(prefixes.values()))[1]
        kv = [(torch.cat([prefixes[id(m)][0][l][0] for m in memories]),  # [B, kv_heads, P, head_dim]
               torch.cat([prefixes[id(m)][0][l][1] for m in memories])) for l in range(model.num_layers)]
        inputs = model._read_inputs(enc["input_ids"], enc["attention_mask"], kv, P, mask_retrieved=False,
                                    new_tokens=max_new_tokens)
        inputs.pop("position_ids")  # generate derives the same ones from the [prefix ; prompt] mask
        out = model.lm.generate(**inputs, max_new_tokens=max_new_tokens, **generate_kwargs)
    with model.using_tokenizer() as tok:
        return tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
