"""A seeded synthetic world of invented people, used to train and evaluate tiny memory models.

Why synthetic: a memory model is only measured honestly on facts it cannot have learned into its
weights. Names are built from syllables, so the space of people is effectively unbounded and every
training step can draw people never seen before; held-out people come from a disjoint part of the
name space (a stable hash of the name), so no training stream can ever contain one.

Every attribute value is a single word drawn from a finite, known list, so a tokenizer can hold each
value as one token and answers can be scored by exact match on one token.

All randomness goes through ``random.Random`` instances passed in or derived from explicit seeds;
nothing here touches the global random state.
"""

from __future__ import annotations

import hashlib
import random
import re
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "ABSTAIN",
    "ATTRIBUTES",
    "BIO_STYLES",
    "NAME_CASINGS",
    "Person",
    "QUESTION_SETS",
    "TextSnippets",
    "World",
    "WorldConfig",
]

# --------------------------------------------------------------------------------------------------
# Fixed inventories. Person names start with one of b d f g h k l m n p r s t; invented cities and
# companies start with one of c j q v w y z; distractor places start with a vowel. Disjoint initials
# mean no person-name word ever begins with a value word, so tokenizations cannot be confused.
# --------------------------------------------------------------------------------------------------

PERSON_SYLLABLES: tuple[str, ...] = (
    "ba", "bel", "bo", "bri", "da", "dor", "dru", "fa", "fen", "fi", "ga", "gor", "gri", "ha",
    "hil", "hol", "ka", "kel", "kor", "la", "len", "lo", "lun", "ma", "mar", "mi", "mor", "na",
    "nel", "nor", "pe", "pim", "pol", "ra", "ren", "ro", "rus", "sa", "sel", "so", "sten", "ta",
    "tam", "tor", "tu", "bek", "dil", "mun",
)

_VALUE_ONSETS: tuple[str, ...] = (
    "ca", "cal", "cor", "ja", "jor", "qua", "quin", "va", "vel", "vor", "wy", "wen", "ya", "yer",
    "za", "zen", "zor", "cyr", "jun", "vis",
)
_CITY_ENDINGS: tuple[str, ...] = (
    "mora", "drel", "thas", "wick", "vale", "ria", "holm", "gard", "nos", "lis", "mere", "dun",
    "stead", "ford", "bria", "land",
)
_COMPANY_ENDINGS: tuple[str, ...] = (
    "vex", "tron", "ion", "ium", "dex", "nix", "ora", "lytics", "soft", "works", "tek", "corp",
    "ware", "gen", "lex", "dyne",
)

JOBS: tuple[str, ...] = (
    "baker", "pilot", "nurse", "teacher", "farmer", "lawyer", "dentist", "plumber", "chef",
    "tailor", "sailor", "doctor", "architect", "engineer", "librarian", "carpenter", "florist",
    "butcher", "journalist", "pharmacist", "mechanic", "electrician", "surgeon", "gardener",
    "banker", "poet", "jeweller", "photographer", "veterinarian", "accountant",
)
PETS: tuple[str, ...] = (
    "cat", "dog", "parrot", "hamster", "rabbit", "goldfish", "tortoise", "ferret", "canary",
    "lizard", "snake", "pony", "goat", "iguana", "gecko", "budgie", "chinchilla", "hedgehog",
    "duck", "frog",
)
COLOURS: tuple[str, ...] = (
    "red", "blue", "green", "yellow", "purple", "orange", "pink", "brown", "black", "white",
    "grey", "teal", "crimson", "violet", "indigo", "maroon", "olive", "amber", "turquoise",
    "silver", "gold", "beige",
)
HOBBIES: tuple[str, ...] = (
    "chess", "fishing", "hiking", "knitting", "cycling", "swimming", "archery", "dancing",
    "singing", "climbing", "juggling", "birdwatching", "fencing", "rowing", "skating", "surfing",
    "origami", "calligraphy", "karaoke", "yoga", "bowling", "tennis", "golf", "sudoku",
)

ATTRIBUTES: tuple[str, ...] = (
    "birth_city", "birth_year", "job", "employer", "pet", "colour", "hobby",
)
"""Every attribute a person has, in a fixed canonical order."""

BIO_STYLES: tuple[str, ...] = ("list", "notes")
"""``list``: ``"Name: c1, c2, ... ."``, one sentence; ``notes``: ``"Name. C1. C2. ..."``."""

# Clause phrasings per attribute; "{v}" is the value and "{a}" its article (a/an). Clauses never
# start with the value, so capitalising a clause (notes style) never changes a value's spelling.
_CLAUSES: dict[str, tuple[str, ...]] = {
    "birth_city": ("from {v}", "born in {v}", "native of {v}"),
    "birth_year": ("born {v}", "born in {v}", "born in the year {v}"),
    "job": ("{a} {v}", "works as {a} {v}", "{a} {v} by trade"),
    "employer": ("at {v}", "works at {v}", "employed by {v}"),
    "pet": ("pet {v}", "owns {a} {v}", "keeps {a} {v}", "has a pet {v}"),
    "colour": ("likes {v}", "likes {v} best", "favourite colour {v}", "loves the colour {v}"),
    "hobby": ("enjoys {v}", "hobby {v}", "spends weekends on {v}", "has {v} as a hobby"),
}
_QUESTIONS: dict[str, tuple[str, ...]] = {
    "birth_city": (
        "Where was {n} born?", "In which city was {n} born?", "What is the birth city of {n}?",
        "Which city is {n} from?", "Where is {n} from?", "What city was {n} born in?",
    ),
    "birth_year": (
        "When was {n} born?", "In what year was {n} born?", "What is the birth year of {n}?",
        "Which year was {n} born in?", "What year was {n} born?",
    ),
    "job": (
        "What is {n}'s job?", "What does {n} do for a living?", "What job does {n} have?",
        "What is the job of {n}?", "What does {n} work as?",
    ),
    "employer": (
        "Where does {n} work?", "Which company employs {n}?", "Who is the employer of {n}?",
        "What company does {n} work at?", "Who employs {n}?",
    ),
    "pet": (
        "What pet does {n} have?", "Which animal does {n} own?", "What is {n}'s pet?",
        "What animal does {n} keep?", "Which pet does {n} own?",
    ),
    "colour": (
        "What is {n}'s favourite colour?", "Which colour does {n} like best?",
        "What colour does {n} love?", "What colour does {n} like?", "What is the favourite colour of {n}?",
    ),
    "hobby": (
        "What is {n}'s hobby?", "What does {n} enjoy?", "Which hobby does {n} have?",
        "What hobby does {n} enjoy?", "What is the hobby of {n}?",
    ),
}
# Question phrasings never used in training: they measure whether a model understands a question or
# matches a template. Every word in them also occurs in training text (biography clauses, trained
# questions), so no embedding is left untrained; only the phrasing is new.
_HELDOUT_QUESTIONS: dict[str, tuple[str, ...]] = {
    "birth_city": ("{n} is a native of which city?", "Which city was {n} born in?"),
    "birth_year": ("{n} was born in which year?", "What year is the birth year of {n}?"),
    "job": ("{n} works as what?", "Which job is the job of {n}?"),
    "employer": ("{n} is employed by which company?", "Which company does {n} work at?"),
    "pet": ("{n} keeps which animal?", "Which animal is the pet of {n}?"),
    "colour": ("{n} loves which colour?", "Which colour is the favourite colour of {n}?"),
    "hobby": ("{n} enjoys which hobby?", "Which hobby is the hobby of {n}?"),
}
QUESTION_SETS: tuple[str, ...] = ("train", "heldout")
"""``train``: the phrasings models are trained on; ``heldout``: phrasings kept for evaluation."""
NAME_CASINGS: tuple[str, ...] = ("as_is", "upper", "lower")
ABSTAIN = "unknown"
"""The answer to a question about a person the model was never told about."""

# Distractor material; none of these words is an attribute value (checked by World.__init__).
_PLACE_KINDS = ("village", "town", "valley", "harbour", "island", "forest", "market", "castle")
_PLACE_ONSETS = ("A", "El", "Ir", "O", "U", "Ash", "Em", "Is", "Or", "Ul", "Ev", "Ab")
_PLACE_ENDINGS = (
    "strav", "mund", "brin", "dell", "wold", "rath", "kesh", "mark", "lowe", "thorn", "grove",
    "moor",
)
_ADJECTIVES = (
    "old", "quiet", "narrow", "windy", "busy", "ancient", "muddy", "sunny", "tall", "small",
    "famous", "crooked", "stone", "wooden", "empty", "rainy",
)
_PLACE_FEATURES = (
    "bridges", "bells", "towers", "gardens", "wells", "markets", "mills", "fountains", "ferries",
    "lanterns", "orchards", "harbours",
)
_PLACE_LOCATIONS = (
    "near a wide river", "on a steep hill", "beside the sea", "at the edge of a marsh",
    "between two lakes", "under a tall cliff", "in a deep valley", "along an old road",
)
_OBJECTS = (
    "lamp", "box", "kettle", "clock", "mirror", "basket", "chair", "bottle", "drum", "key",
    "ladder", "bucket", "rope", "coin", "bowl", "bell",
)
_MATERIALS = ("glass", "iron", "oak", "clay", "copper", "brass", "wool", "stone", "tin", "paper")
_ROOMS = ("kitchen", "attic", "cellar", "hall", "library", "workshop", "barn", "shed")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


@dataclass(frozen=True)
class Person:
    """An invented person: a two-word name and one single-word value per attribute."""

    name: str
    attrs: dict[str, str]

    @property
    def first_name(self) -> str:
        return self.name.split(" ")[0]


@dataclass
class WorldConfig:
    """What fixes a world. The same config always yields the same value vocabularies."""

    seed: int = 0
    n_cities: int = 40
    n_employers: int = 40
    min_year: int = 1940
    max_year: int = 2005
    first_name_syllables: tuple[int, int] = (2, 2)
    """Inclusive range of syllables in a first name."""
    last_name_syllables: tuple[int, int] = (2, 3)
    heldout_modulus: int = 10
    """A name whose stable hash is 0 modulo this belongs to the held-out split (1 in 10 names)."""
    attributes: tuple[str, ...] = ATTRIBUTES
    """Attributes people have; a subset of ATTRIBUTES (fewer means shorter biographies)."""
    bio_max_tokens: int = 31
    """Token budget of a biography, special tokens excluded (31 + <bos> = 32 = K)."""


class TextSnippets:
    """Short windows of English text, used as distractors that have nothing to do with people.

    Text is folded to ASCII and whitespace-collapsed so a world tokenizer covers it without
    unknown tokens. Built from strings or files given by the caller; nothing is read implicitly.
    The default 6-14 words take about 14-32 tokens of a world tokenizer (~2.2 tokens a word).
    """

    def __init__(self, texts: Iterable[str], min_words: int = 6, max_words: int = 14) -> None:
        words: list[str] = []
        for text in texts:
            words.extend(ascii_fold(text).split())
        if len(words) < max_words:
            raise ValueError(f"need at least {max_words} words of text, got {len(words)}")
        self._words = words
        self.min_words = min_words
        self.max_words = max_words

    @classmethod
    def from_files(
        cls, paths: Iterable[str | Path], min_words: int = 6, max_words: int = 14
    ) -> TextSnippets:
        texts = (Path(p).read_text(encoding="utf-8", errors="replace") for p in paths)
        return cls(texts, min_words=min_words, max_words=max_words)

    def __len__(self) -> int:
        return len(self._words)

    def sample(self, rng: random.Random) -> str:
        """A random window of ``min_words``..``max_words`` consecutive words."""
        n = rng.randint(self.min_words, self.max_words)
        start = rng.randrange(len(self._words) - n + 1)
        return " ".join(self._words[start : start + n])


def ascii_fold(text: str) -> str:
    """Fold typographic characters to ASCII and collapse whitespace to single spaces."""
    text = (
        text.replace("\u2018", "'").replace("\u2019", "'")
        .replace("\u201c", '"').replace("\u201d", '"')
        .replace("\u2014", " - ").replace("\u2013", "-")
    )
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    return re.sub(r"\s+", " ", text).strip()


_SYLLABLES_BY_INITIAL: dict[str, tuple[str, ...]] = {
    c: tuple(syl for syl in PERSON_SYLLABLES if syl[0] == c)
    for c in sorted({syl[0] for syl in PERSON_SYLLABLES})
}


def _min_syllables(word: str) -> int | None:
    """Fewest person-name syllables spelling ``word`` (lower case), or None if none do."""
    best: list[int | None] = [0] + [None] * len(word)  # best[i]: fewest syllables for word[:i]
    for i in range(len(word)):
        here = best[i]
        if here is None:
            continue
        for syl in _SYLLABLES_BY_INITIAL.get(word[i], ()):
            if word.startswith(syl, i):
                j = i + len(syl)
                there = best[j]
                if there is None or here + 1 < there:
                    best[j] = here + 1
    return best[-1]


def _count_within(costs: Sequence[tuple[int, ...]], budget: int) -> list[list[int]]:
    """``ways[i][b]``: combinations of one option per slot i.. whose costs sum to at most b."""
    ways = [[0] * (budget + 1) for _ in costs] + [[1] * (budget + 1)]
    for i in reversed(range(len(costs))):
        for b in range(budget + 1):
            ways[i][b] = sum(ways[i + 1][b - c] for c in costs[i] if c <= b)
    return ways


def _sample_within(
    rng: random.Random, costs: Sequence[tuple[int, ...]], budget: int, ways: list[list[int]]
) -> list[int]:
    """One option index per slot, uniform over all combinations costing at most ``budget``."""
    choice: list[int] = []
    for i, slot in enumerate(costs):
        weights = [ways[i + 1][budget - c] if c <= budget else 0 for c in slot]
        k = rng.choices(range(len(slot)), weights=weights)[0]
        budget -= slot[k]
        choice.append(k)
    return choice


def _stable_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


class World:
    """A synthetic world: value vocabularies fixed by ``config``, people drawn from seeds.

    Methods taking an ``rng`` consume it deterministically; methods taking a ``seed`` build their
    own ``random.Random`` from that seed and the world seed.
    """

    def __init__(self, config: WorldConfig | None = None, snippets: TextSnippets | None = None):
        self.config = config or WorldConfig()
        self.snippets = snippets
        unknown = set(self.config.attributes) - set(ATTRIBUTES)
        if unknown:
            raise ValueError(f"unknown attributes: {sorted(unknown)}")
        self.attributes: tuple[str, ...] = tuple(
            a for a in ATTRIBUTES if a in self.config.attributes
        )
        rng = random.Random(f"world-values:{self.config.seed}")
        city_pool = [o.capitalize() + e for o in _VALUE_ONSETS for e in _CITY_ENDINGS]
        cities = rng.sample(city_pool, self.config.n_cities)
        company_pool = [o.capitalize() + e for o in _VALUE_ONSETS for e in _COMPANY_ENDINGS]
        company_pool = [c for c in company_pool if c not in cities]
        companies = rng.sample(company_pool, self.config.n_employers)
        years = [str(y) for y in range(self.config.min_year, self.config.max_year + 1)]
        all_values: dict[str, tuple[str, ...]] = {
            "birth_city": tuple(sorted(cities)),
            "birth_year": tuple(years),
            "job": JOBS,
            "employer": tuple(sorted(companies)),
            "pet": PETS,
            "colour": COLOURS,
            "hobby": HOBBIES,
        }
        self._values = {a: all_values[a] for a in self.attributes}
        # Values are single tokens, so a clause costs the same whatever its value.
        self._clause_costs = {
            a: tuple(self.token_bound(self._fill(t, "x")) for t in _CLAUSES[a]) for a in ATTRIBUTES
        }
        self._fit_counts: dict[tuple[tuple[str, ...], int], list[list[int]]] = {}
        self._check_vocabularies(all_values)

    @staticmethod
    def _check_vocabularies(all_values: dict[str, tuple[str, ...]]) -> None:
        flat = [v for vs in all_values.values() for v in vs]
        if len(flat) != len(set(flat)):
            raise AssertionError("attribute values must be unique across attributes")
        distractor_words = set(
            _PLACE_KINDS + _ADJECTIVES + _PLACE_FEATURES + _OBJECTS + _MATERIALS + _ROOMS
        )
        for loc in _PLACE_LOCATIONS:
            distractor_words.update(loc.split())
        clash = distractor_words & set(flat)
        if clash:
            raise AssertionError(f"distractor words clash with values: {sorted(clash)}")
        if any(not re.fullmatch(r"[A-Za-z0-9]+", v) for v in flat):
            raise AssertionError("every value must be a single alphanumeric word")

    # ---------------------------------------------------------------------------------- values

    def values(self, attribute: str) -> tuple[str, ...]:
        """All possible values of an attribute, in a fixed order."""
        return self._values[attribute]

    def all_values(self) -> list[str]:
        """Every value of every attribute (what a tokenizer should hold as single tokens)."""
        return [v for a in self.attributes for v in self._values[a]]

    @staticmethod
    def name_syllables() -> tuple[str, ...]:
        """Syllables person names are made of (lower case; word-initial ones are capitalised)."""
        return PERSON_SYLLABLES

    # ---------------------------------------------------------------------------------- people

    def split_of(self, name: str) -> str:
        """``"heldout"`` or ``"train"``: a pure function of the name, so the split never drifts."""
        return "heldout" if _stable_hash(name) % self.config.heldout_modulus == 0 else "train"

    def _name_word(self, rng: random.Random, n_range: tuple[int, int]) -> str:
        n = rng.randint(*n_range)
        return "".join(rng.choice(PERSON_SYLLABLES) for _ in range(n)).capitalize()

    def sample_name(self, rng: random.Random, split: str = "train") -> str:
        """A fresh name in ``split``; names of the other split are rejected and redrawn."""
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
        while True:
            name = (
                self._name_word(rng, self.config.first_name_syllables)
                + " "
                + self._name_word(rng, self.config.last_name_syllables)
            )
            if self.split_of(name) == split:
                return name

    def sample_person(self, rng: random.Random, split: str = "train") -> Person:
        """A person with a fresh name in ``split`` and independently uniform attribute values."""
        name = self.sample_name(rng, split)
        attrs = {a: rng.choice(self._values[a]) for a in self.attributes}
        return Person(name=name, attrs=attrs)

    def people_stream(self, split: str = "train", seed: int = 0) -> Iterator[Person]:
        """An endless, deterministic stream of people (names may rarely repeat in long streams)."""
        rng = random.Random(f"people:{self.config.seed}:{split}:{seed}")
        while True:
            yield self.sample_person(rng, split)

    def people(self, n: int, split: str = "train", seed: int = 0) -> list[Person]:
        """``n`` people with distinct names, e.g. a fixed world for stage-1 in-context training."""
        out: list[Person] = []
        seen: set[str] = set()
        for person in self.people_stream(split, seed):
            if person.name not in seen:
                seen.add(person.name)
                out.append(person)
                if len(out) == n:
                    break
        return out

    def heldout_people(self, n: int, seed: int = 0) -> list[Person]:
        """``n`` distinct held-out people; never produced by any ``train`` stream."""
        return self.people(n, split="heldout", seed=seed)

    # ---------------------------------------------------------------------------------- text

    def biography(
        self,
        person: Person,
        rng: random.Random,
        style: str | None = None,
        attributes: Sequence[str] | None = None,
        max_tokens: int | None = None,
    ) -> str:
        """A short biography: facts in shuffled order, each in a randomly chosen phrasing.

        ``style`` is one of BIO_STYLES (random if None); ``attributes`` restricts which facts are
        stated (all of the person's by default). Phrasings are drawn so that the biography fits
        ``max_tokens`` (default ``config.bio_max_tokens``) as counted by ``token_bound``: a memory
        writing K vectors per injection keeps only the last K tokens, so longer bios lose facts.
        """
        if style is None:
            style = rng.choice(BIO_STYLES)
        if style not in BIO_STYLES:
            raise ValueError(f"unknown biography style {style!r}; expected one of {BIO_STYLES}")
        budget = self.config.bio_max_tokens if max_tokens is None else max_tokens
        wanted = set(person.attrs if attributes is None else attributes)
        attrs = tuple(a for a in ATTRIBUTES if a in wanted)
        # The name, then one separator after it and after each clause; the rest is for clauses.
        # Phrasings are uniform over all combinations that fit, so none is tied to a position.
        left = budget - self.token_bound(person.name) - len(attrs) - 1
        costs = [self._clause_costs[a] for a in attrs]
        ways = self._fit_counts.get((attrs, left)) if left >= 0 else None
        if ways is None and left >= 0:
            ways = self._fit_counts[(attrs, left)] = _count_within(costs, left)
        if ways is None or ways[0][left] == 0:
            raise ValueError(f"{len(attrs)} facts about {person.name!r} cannot fit {budget} tokens")
        choice = _sample_within(rng, costs, left, ways)
        clauses = [self._fill(_CLAUSES[a][k], person.attrs[a]) for a, k in zip(attrs, choice)]
        rng.shuffle(clauses)
        if style == "list":
            return f"{person.name}: " + ", ".join(clauses) + "."
        return " ".join([f"{person.name}."] + [c[0].upper() + c[1:] + "." for c in clauses])

    @staticmethod
    def _fill(template: str, value: str) -> str:
        return template.format(v=value, a=_article(value))

    @staticmethod
    def token_bound(text: str) -> int:
        """Tokens ``text`` takes with a world tokenizer, at most (exact for this module's text).

        Each punctuation mark counts one, each person-name word its fewest syllables, any other
        word one: the world tokenizer holds values, template words and syllables as pieces.
        """
        total = 0
        for word in re.findall(r"[A-Za-z0-9]+|[^A-Za-z0-9\s]", text):
            syllables = _min_syllables(word.lower()) if word[0].isupper() else None
            total += syllables if syllables is not None and syllables > 1 else 1
        return total

    @staticmethod
    def template_words() -> list[str]:
        """Every word of the biography and question templates, as spelled in generated text."""
        words: set[str] = {"a", "an", "Q", "A", "An", ABSTAIN}
        for templates in list(_CLAUSES.values()) + list(_QUESTIONS.values()) + list(_HELDOUT_QUESTIONS.values()):
            for template in templates:
                plain = re.sub(r"\{[a-z]\}", " ", template)
                for word in re.findall(r"[A-Za-z]+", plain):
                    words.update((word, word[0].upper() + word[1:]))
        words.discard("s")  # the possessive "'s" is split into "'" and "s"
        return sorted(words)

    def question(self, person: Person, attribute: str, rng: random.Random, phrasings: str = "train",
                 casing: str = "as_is", stranger: bool = False) -> tuple[str, str]:
        """``(prompt, answer)``: prompt ends with ``"A:"``, answer is ``" " + value``.

        The answer's leading space makes ``prompt + answer`` tokenize as prompt tokens followed
        by the single value token. ``phrasings`` is one of QUESTION_SETS, ``casing`` one of
        NAME_CASINGS (how the name is written); a ``stranger`` (someone the model was not told
        about) is answered with ABSTAIN.
        """
        templates = {"train": _QUESTIONS, "heldout": _HELDOUT_QUESTIONS}.get(phrasings)
        if templates is None:
            raise ValueError(f"phrasings must be one of {QUESTION_SETS}, got {phrasings!r}")
        name = {"as_is": person.name, "upper": person.name.upper(), "lower": person.name.lower()}.get(casing)
        if name is None:
            raise ValueError(f"casing must be one of {NAME_CASINGS}, got {casing!r}")
        text = rng.choice(templates[attribute]).format(n=name)
        return f"Q: {text} A:", " " + (ABSTAIN if stranger else person.attrs[attribute])

    def distractor(self, rng: random.Random) -> str:
        """A short text about no person: an invented place, an object, or English text if given."""
        kinds = ["place", "object"] + (["english"] if self.snippets is not None else [])
        kind = rng.choice(kinds)
        if kind == "english":
            assert self.snippets is not None
            return self.snippets.sample(rng)
        if kind == "place":
            name = rng.choice(_PLACE_ONSETS) + rng.choice(_PLACE_ENDINGS)
            place = rng.choice(_PLACE_KINDS)
            return (
                f"The {place} of {name} lies {rng.choice(_PLACE_LOCATIONS)} and is known for "
                f"its {rng.choice(_ADJECTIVES)} {rng.choice(_PLACE_FEATURES)}."
            )
        obj, adj = rng.choice(_OBJECTS), rng.choice(_ADJECTIVES)
        return (
            f"The {adj} {obj} in the {rng.choice(_ROOMS)} is made of "
            f"{rng.choice(_MATERIALS)} and weighs {rng.randint(2, 40)} kilos."
        )

    def corpus(
        self,
        n_docs: int,
        seed: int = 0,
        people: Sequence[Person] | None = None,
    ) -> Iterator[str]:
        """Documents for tokenizer training and LM pretraining.

        A mix of: biographies alone, one to three biographies followed by questions answered in
        context (``"<bio> Q: ... A: value"``), and distractors. People come from ``people`` if
        given (a fixed world), else fresh from the training split.
        """
        rng = random.Random(f"corpus:{self.config.seed}:{seed}")
        stream = self.people_stream("train", seed=seed)

        def draw() -> Person:
            return rng.choice(people) if people is not None else next(stream)

        for _ in range(n_docs):
            r = rng.random()
            if r < 0.15:
                yield self.biography(draw(), rng)
            elif r < 0.85:
                group = [draw() for _ in range(rng.randint(1, 3))]
                parts = [self.biography(p, rng) for p in group]
                if rng.random() < 0.3:
                    parts.insert(rng.randrange(len(parts) + 1), self.distractor(rng))
                for _ in range(rng.randint(1, 3)):
                    p = rng.choice(group)
                    prompt, answer = self.question(p, rng.choice(self.attributes), rng)
                    parts.append(prompt + answer)
                yield " ".join(parts)
            else:
                yield self.distractor(rng)
