"""A small tokenizer for the synthetic world, saved as a Hugging Face fast tokenizer.

Why this design: a Unigram model over space-marked words (``"▁Velmora"``), with punctuation split
off first. Unigram picks the segmentation with the highest total log-probability, so we give every
attribute value, every word of the world's templates and every name syllable the highest score in
the vocabulary. All scores are negative, so any split into m pieces scores at most m times the top
score, which guarantees:

* every attribute value and template word, after a space, is exactly one token;
* a name word of n syllables is at most n tokens;

hence ``World.token_bound`` bounds the length of every biography and question.

The pieces themselves come from a BPE trainer (the ``tokenizers`` Unigram trainer gave poor
pieces on this corpus, e.g. ``"▁", "w", "a", "s"`` for " was"); they are scored by hard-EM counts
of their use in the corpus, and the least used are pruned to reach ``vocab_size`` exactly.

Decoding is exact for text with single spaces (the normalizer collapses other whitespace).
"""

from __future__ import annotations

import math
import string
from collections import Counter
from collections.abc import Iterable

from tokenizers import (
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)
from tokenizers.trainers import BpeTrainer
from transformers import PreTrainedTokenizerFast

from memllm.synthetic.world import World

__all__ = [
    "SPECIAL_TOKENS",
    "WORD_MARK",
    "required_pieces",
    "train_world_tokenizer",
    "value_token_ids",
]

BOS, EOS, PAD, UNK = "<bos>", "<eos>", "<pad>", "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, UNK, BOS, EOS)
"""Special tokens; ids 0..3 in this order."""
WORD_MARK = "\u2581"
"""Marks the start of a word inside pieces, as in SentencePiece."""
_ALPHABET: tuple[str, ...] = (
    tuple(string.ascii_letters + string.digits + string.punctuation)
    + tuple(WORD_MARK + c for c in string.ascii_letters + string.digits)
    + (WORD_MARK,)
)
"""Pieces always kept, so any printable ASCII text encodes without <unk>."""


def _pipeline(model: models.Model) -> Tokenizer:
    tok = Tokenizer(model)
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFKC(), normalizers.Replace(Regex(r"\s+"), " ")]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Punctuation("isolated"),
            pre_tokenizers.Metaspace(replacement=WORD_MARK, prepend_scheme="first", split=True),
        ]
    )
    tok.decoder = decoders.Metaspace(replacement=WORD_MARK, prepend_scheme="first", split=True)
    return tok


def required_pieces(world: World) -> list[str]:
    """Pieces held at top score: values, template words, and name syllables (initial/internal)."""
    pieces = [WORD_MARK + v for v in world.all_values()]
    pieces += [WORD_MARK + w for w in world.template_words()]
    for syl in world.name_syllables():
        pieces.append(WORD_MARK + syl.capitalize())
        pieces.append(syl)
    return list(dict.fromkeys(pieces))


def _unigram(scores: dict[str, float], forced: list[str]) -> models.Unigram:
    """A Unigram model with specials first and ``forced`` pieces at the top score."""
    top = max(scores.values())
    if top >= 0:
        raise AssertionError("scores are log-probabilities and must be negative")
    held = set(forced)
    vocab = [(s, 0.0) for s in SPECIAL_TOKENS]
    vocab += [(p, sc) for p, sc in scores.items() if p not in held]
    vocab += [(p, top) for p in forced]
    return models.Unigram(vocab, unk_id=SPECIAL_TOKENS.index(UNK), byte_fallback=False)


def _use_counts(model: models.Model, words: Counter[str], pieces: Iterable[str]) -> Counter[str]:
    counts: Counter[str] = Counter({p: 0 for p in pieces})
    for word, n in words.items():
        for token in model.tokenize(word):
            counts[token.value] += n
    return counts


def _log_scores(counts: Counter[str]) -> dict[str, float]:
    """Log relative frequencies; unused pieces get half a count so they stay finite and lowest."""
    total = sum(counts.values()) + 1
    return {p: math.log(max(c, 0.5) / total) for p, c in counts.items()}


def train_world_tokenizer(
    world: World,
    extra_texts: Iterable[str] = (),
    vocab_size: int = 1024,
    seed: int = 0,
    n_docs: int = 10_000,
    add_bos: bool = True,
) -> PreTrainedTokenizerFast:
    """Train on ``world.corpus(n_docs, seed)`` plus ``extra_texts``; exactly ``vocab_size`` ids.

    Deterministic for fixed arguments. With ``add_bos``, encoding with special tokens prepends
    ``<bos>`` (as Llama tokenizers do); ``<eos>`` is left to the caller.
    """
    forced = required_pieces(world)
    n_fixed = len(SPECIAL_TOKENS) + len(set(_ALPHABET) | set(forced))
    if vocab_size < n_fixed + 64:
        raise ValueError(f"vocab_size {vocab_size} too small: {n_fixed} ids are fixed")
    texts = list(world.corpus(n_docs, seed=seed)) + list(extra_texts)

    # 1. Candidate pieces from BPE; it only has to propose, so give it some room.
    bpe = _pipeline(models.BPE(unk_token=UNK))
    trainer = BpeTrainer(
        vocab_size=vocab_size + vocab_size // 4,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=list(string.ascii_letters + string.digits + string.punctuation),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)

    # 2. Word (pre-token) frequencies: segmentation is per word, so words suffice for counting.
    words: Counter[str] = Counter()
    for text in texts:
        normalized = bpe.normalizer.normalize_str(text)
        words.update(w for w, _ in bpe.pre_tokenizer.pre_tokenize_str(normalized))

    # 3. Hard EM: score candidates by use, prune the least used, score again.
    candidates = [p for p in bpe.get_vocab() if p not in SPECIAL_TOKENS]
    candidates = list(dict.fromkeys(sorted(candidates) + list(_ALPHABET) + forced))
    scores = _log_scores(_use_counts(bpe.model, words, candidates))
    for _ in range(2):
        scores = _log_scores(_use_counts(_unigram(scores, forced), words, scores))
    keep = set(_ALPHABET) | set(forced)
    free = [p for p in scores if p not in keep]
    free.sort(key=lambda p: (-scores[p], p))
    kept = keep | set(free[: vocab_size - len(SPECIAL_TOKENS) - len(keep)])
    scores = {p: s for p, s in scores.items() if p in kept}
    scores = _log_scores(_use_counts(_unigram(scores, forced), words, scores))

    tok = _pipeline(_unigram(scores, forced))
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A",
            pair=f"{BOS} $A {BOS} $B",
            special_tokens=[(BOS, SPECIAL_TOKENS.index(BOS))],
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=4096,
    )


def value_token_ids(tokenizer: PreTrainedTokenizerFast, world: World) -> dict[str, dict[str, int]]:
    """Token id of each attribute value (as answered, with a leading space), per attribute.

    Raises if a value is not a single token, which ``train_world_tokenizer`` guarantees.
    """
    out: dict[str, dict[str, int]] = {}
    for attribute in world.attributes:
        ids: dict[str, int] = {}
        for value in world.values(attribute):
            enc = tokenizer(" " + value, add_special_tokens=False)["input_ids"]
            if len(enc) != 1:
                raise ValueError(f"value {value!r} is {len(enc)} tokens")
            ids[value] = enc[0]
        out[attribute] = ids
    return out
