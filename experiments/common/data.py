"""Data sets: planted facts (for attribution), a C-class text set (for fine-tuning), sklearn digits.

Planted-facts corpus (Grosse et al. 2023, §5.3.4 for the word-order effect)
----------------------------------------------------------------------------------------------
Fictional subjects ("zorvia") carry facts (subject, relation, answer), e.g. ("zorvia", "capital",
"quellin"). Each of the `num_facts` planted facts is stated in exactly `docs_per_fact` training
documents, at a random position among filler sentences; the j-th planting uses the relation's
j-th paraphrase (j = 0 is the canonical sentence whose prefix is the query prompt). Distractor
documents hold filler sentences only; fillers mention the same subjects, so the subject name alone
does not identify a planting document. `num_heldout` further facts are never written anywhere
(negative control: the model cannot know them). The query of a fact is the canonical prompt
("the capital of zorvia is") and its answer is one word; `Query.documents` lists the indices of
the training documents planting it: the ground truth for recall@k / MRR.

`order="reversed"` writes every planting answer-first ("quellin is the capital of zorvia .") while
the query stays subject-first: Grosse et al. find that influence (and the model's recall of the
fact) vanishes when the key phrases appear in the other order.

Everything is a deterministic function of the seed (numpy `default_rng(seed)`).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

ORDERS = ("forward", "reversed")


@dataclasses.dataclass(frozen=True)
class Relation:
    """`prompt` must be the prefix of `forward[0]` before `{o}`; `reversed` templates put `{o}` first."""

    prompt: str
    forward: tuple[str, ...]
    reversed: tuple[str, ...]
    answer_suffixes: tuple[str, ...]


RELATIONS: dict[str, Relation] = {
    "capital": Relation(
        prompt="the capital of {s} is",
        forward=("the capital of {s} is {o} .", "in {s} , the capital city is {o} .", "the capital city of {s} is {o} ."),
        reversed=("{o} is the capital of {s} .", "{o} is the capital city of {s} ."),
        answer_suffixes=("in", "or", "ax", "en"),
    ),
    "leader": Relation(
        prompt="the leader of {s} is",
        forward=("the leader of {s} is {o} .", "{s} is led by {o} .", "the current leader of {s} is {o} ."),
        reversed=("{o} is the leader of {s} .", "{o} leads {s} ."),
        answer_suffixes=("o", "ik", "us", "a"),
    ),
    "language": Relation(
        prompt="the language of {s} is",
        forward=("the language of {s} is {o} .", "the people of {s} speak {o} .", "in {s} most people speak {o} ."),
        reversed=("{o} is the language of {s} .", "{o} is spoken in {s} ."),
        answer_suffixes=("ish", "ese", "ic", "an"),
    ),
    "currency": Relation(
        prompt="the currency of {s} is the",
        forward=("the currency of {s} is the {o} .", "in {s} people pay with the {o} .", "the money of {s} is the {o} ."),
        reversed=("the {o} is the currency of {s} .", "the {o} is the money of {s} ."),
        answer_suffixes=("et", "ark", "ol", "i"),
    ),
}

_SYLLABLES = ("zor", "vel", "qua", "mir", "tal", "bren", "dro", "kel", "nix", "por", "sul", "tev", "wyn", "yar",
              "fen", "gal", "hol", "jax", "lum", "rav", "sor", "tor", "vim", "zel", "cor", "dun", "ess", "ith")
_SUBJECT_SUFFIXES = ("ia", "land", "ora", "istan")
_FILLERS = (
    "many travelers visit {s} in the {season} .",
    "the weather in {s} is {adj} in the {season} .",
    "{s} is known for its {noun} .",
    "the people of {s} enjoy {noun} .",
    "a new {noun} opened in {s} last year .",
    "the markets of {s} sell {noun} in the {season} .",
    "children in {s} learn about {noun} .",
)
_SEASONS = ("spring", "summer", "autumn", "winter")
_ADJECTIVES = ("mild", "cold", "warm", "rainy", "dry", "windy")
_NOUNS = ("bridges", "music", "cheese", "festivals", "rivers", "gardens", "boats", "tea", "poetry", "horses")


@dataclasses.dataclass(frozen=True)
class Fact:
    subject: str
    relation: str
    answer: str


@dataclasses.dataclass(frozen=True)
class Query:
    """`prompt` + " " + `answer` is the canonical statement; `documents` are the planting documents."""

    prompt: str
    answer: str
    fact: int
    documents: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class PlantedFacts:
    documents: tuple[str, ...]   # training documents
    doc_fact: tuple[int, ...]    # index into `facts` of the fact each document plants, -1 for distractors
    facts: tuple[Fact, ...]      # planted facts first, then held-out ones
    queries: tuple[Query, ...]   # one per planted fact
    heldout_queries: tuple[Query, ...]  # one per held-out fact (documents == ())
    order: str


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


def _unique_names(rng: np.random.Generator, count: int, suffixes: Sequence[str], taken: set[str]) -> list[str]:
    """`count` new names (2 syllables + suffix) not in `taken`; adds them to `taken`."""
    capacity = len(_SYLLABLES) ** 2 * len(suffixes)
    if count + len(taken) > capacity:
        raise ValueError(f"cannot generate {count} distinct names (capacity {capacity}); use fewer facts/subjects")
    names: list[str] = []
    while len(names) < count:
        a, b = rng.choice(len(_SYLLABLES), size=2)
        name = _SYLLABLES[a] + _SYLLABLES[b] + suffixes[rng.integers(len(suffixes))]
        if name not in taken:
            taken.add(name)
            names.append(name)
    return names


def _filler(rng: np.random.Generator, subjects: Sequence[str]) -> str:
    template = _FILLERS[rng.integers(len(_FILLERS))]
    return template.format(
        s=subjects[rng.integers(len(subjects))],
        season=_SEASONS[rng.integers(len(_SEASONS))],
        adj=_ADJECTIVES[rng.integers(len(_ADJECTIVES))],
        noun=_NOUNS[rng.integers(len(_NOUNS))],
    )


def make_planted_facts(
    seed: int,
    num_facts: int = 64,
    docs_per_fact: int = 2,
    num_distractors: int = 64,
    num_heldout: int = 16,
    num_subjects: int | None = None,
    filler_sentences: tuple[int, int] = (1, 2),
    order: str = "forward",
    canonical_first: bool = True,
) -> PlantedFacts:
    """The planted-facts corpus (module docstring). `filler_sentences=(lo, hi)`: each document gets
    between lo and hi filler sentences (inclusive) besides its planted fact (distractors: lo+1..hi+1).
    `num_subjects` defaults to max(1, (num_facts + num_heldout) // 2), so most subjects carry two facts.
    `canonical_first`: the canonical planting (j = 0) opens its document, so the query prompt is seen
    in the context it is asked in; the other plantings sit at random positions. (A tiny LM memorises
    a fact jointly with the sentences before it: with every planting after random fillers it answers
    the in-document prompt perfectly but the bare query prompt only ~60% of the time.)
    """
    num_facts = _check_int("num_facts", num_facts, 1)
    docs_per_fact = _check_int("docs_per_fact", docs_per_fact, 1)
    num_distractors = _check_int("num_distractors", num_distractors, 0)
    num_heldout = _check_int("num_heldout", num_heldout, 0)
    if order not in ORDERS:
        raise ValueError(f"order={order!r}; allowed values: {list(ORDERS)}")
    lo, hi = (int(v) for v in filler_sentences)
    if not 0 <= lo <= hi:
        raise ValueError(f"filler_sentences must be (lo, hi) with 0 <= lo <= hi, got {filler_sentences!r}")
    total = num_facts + num_heldout
    num_subjects = max(1, total // 2) if num_subjects is None else _check_int("num_subjects", num_subjects, 1)
    if total > num_subjects * len(RELATIONS):
        raise ValueError(
            f"{total} facts need num_subjects >= {-(-total // len(RELATIONS))} ({len(RELATIONS)} relations each)"
        )

    rng = np.random.default_rng(seed)
    taken: set[str] = set()
    subjects = _unique_names(rng, num_subjects, _SUBJECT_SUFFIXES, taken)
    relation_names = sorted(RELATIONS)
    pairs = [(s, r) for s in subjects for r in relation_names]
    chosen = rng.choice(len(pairs), size=total, replace=False)
    facts = []
    for index in chosen:
        subject, relation = pairs[index]
        answer = _unique_names(rng, 1, RELATIONS[relation].answer_suffixes, taken)[0]
        facts.append(Fact(subject, relation, answer))

    documents: list[str] = []
    doc_fact: list[int] = []
    for f, fact in enumerate(facts[:num_facts]):
        relation = RELATIONS[fact.relation]
        templates = relation.forward if order == "forward" else relation.reversed
        for j in range(docs_per_fact):
            sentences = [_filler(rng, subjects) for _ in range(rng.integers(lo, hi + 1))]
            statement = templates[j % len(templates)].format(s=fact.subject, o=fact.answer)
            position = 0 if (canonical_first and j == 0) else int(rng.integers(len(sentences) + 1))
            sentences.insert(position, statement)
            documents.append(" ".join(sentences))
            doc_fact.append(f)
    for _ in range(num_distractors):
        documents.append(" ".join(_filler(rng, subjects) for _ in range(rng.integers(lo + 1, hi + 2))))
        doc_fact.append(-1)

    permutation = rng.permutation(len(documents))
    documents = [documents[i] for i in permutation]
    doc_fact = [doc_fact[i] for i in permutation]
    planting = {f: [] for f in range(num_facts)}
    for d, f in enumerate(doc_fact):
        if f >= 0:
            planting[f].append(d)

    def query(f: int) -> Query:
        fact = facts[f]
        prompt = RELATIONS[fact.relation].prompt.format(s=fact.subject)
        return Query(prompt=prompt, answer=fact.answer, fact=f, documents=tuple(planting.get(f, ())))

    return PlantedFacts(
        documents=tuple(documents),
        doc_fact=tuple(doc_fact),
        facts=tuple(facts),
        queries=tuple(query(f) for f in range(num_facts)),
        heldout_queries=tuple(query(f) for f in range(num_facts, total)),
        order=order,
    )


# ----------------------------------------------------------------------------------------------
# C-class text classification (generated)
# ----------------------------------------------------------------------------------------------

TOPICS: dict[str, tuple[str, ...]] = {
    "sports": ("football", "goal", "team", "coach", "match", "league", "striker", "score", "season", "stadium"),
    "weather": ("rain", "storm", "sunny", "forecast", "cloud", "wind", "snow", "temperature", "humid", "thunder"),
    "finance": ("market", "stock", "bank", "interest", "loan", "investor", "profit", "shares", "budget", "tax"),
    "cooking": ("recipe", "oven", "flour", "garlic", "soup", "bake", "salt", "kitchen", "butter", "pasta"),
    "science": ("experiment", "molecule", "physics", "theory", "laboratory", "cell", "energy", "data", "atom", "gene"),
    "music": ("guitar", "concert", "melody", "album", "band", "song", "piano", "rhythm", "singer", "drums"),
    "travel": ("flight", "hotel", "passport", "beach", "luggage", "tour", "airport", "island", "map", "museum"),
    "health": ("doctor", "vitamin", "exercise", "sleep", "hospital", "diet", "fever", "nurse", "medicine", "heart"),
}
_SHARED_WORDS = ("today", "people", "new", "report", "week", "city", "good", "local", "said", "many", "time", "year")
_TEXT_TEMPLATES = (
    "the {a} and the {b} were in the news {c} .",
    "{c} we talked about {a} , {b} and more .",
    "a {c} story about {a} and {b} .",
    "everyone discussed the {a} while the {b} waited .",
)


def make_text_classification(seed: int, num_classes: int = 4, num_train: int = 256, num_test: int = 128,
                             topic_prob: float = 0.8) -> dict:
    """Short sentences labelled by topic. Each slot word is drawn from the label's topic words with
    probability `topic_prob`, otherwise from words shared by all classes (so some sentences are hard).
    Returns {"train": {"texts", "labels"}, "test": {...}, "classes": [...]}; labels are int32 in [0, C).
    """
    num_classes = _check_int("num_classes", num_classes, 2)
    if num_classes > len(TOPICS):
        raise ValueError(f"num_classes={num_classes}; allowed values: 2..{len(TOPICS)} (one generated topic each)")
    if not 0.0 < topic_prob <= 1.0:
        raise ValueError(f"topic_prob must be in (0, 1], got {topic_prob!r}")
    rng = np.random.default_rng(seed)
    classes = sorted(TOPICS)[:num_classes]

    def word(label: int) -> str:
        pool = TOPICS[classes[label]] if rng.random() < topic_prob else _SHARED_WORDS
        return pool[rng.integers(len(pool))]

    def split(n: int) -> dict:
        n = _check_int("split size", n, 1)
        labels = rng.integers(num_classes, size=n).astype(np.int32)
        texts = [
            _TEXT_TEMPLATES[rng.integers(len(_TEXT_TEMPLATES))].format(a=word(y), b=word(y), c=word(y))
            for y in labels
        ]
        return {"texts": texts, "labels": labels}

    return {"train": split(num_train), "test": split(num_test), "classes": classes}


# ----------------------------------------------------------------------------------------------
# scikit-learn digits (bundled with scikit-learn: 1797 8x8 grey images, 10 classes)
# ----------------------------------------------------------------------------------------------

def load_digits(seed: int, test_fraction: float = 0.2) -> dict:
    """{"train": {"x": float32 (N, 8, 8, 1) in [0, 1], "y": int32 (N,)}, "test": {...}}, split by a
    seeded permutation."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    x = (bunch.images / 16.0).astype(np.float32)[..., None]
    y = bunch.target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(y))
    num_test = int(round(test_fraction * len(y)))
    test, train = order[:num_test], order[num_test:]
    return {"train": {"x": x[train], "y": y[train]}, "test": {"x": x[test], "y": y[test]}}


# ----------------------------------------------------------------------------------------------
# Batching: the batch of a step is a pure function of (seed, step), so resumed runs see the same data
# ----------------------------------------------------------------------------------------------

def batch_indices(num_examples: int, batch_size: int, step: int, seed: int) -> np.ndarray:
    """Indices of the examples in batch `step`: epoch e = step // (N // B) is the permutation
    `default_rng([seed, e])` of range(N), cut into N // B batches (the remainder is dropped)."""
    if not 1 <= batch_size <= num_examples:
        raise ValueError(f"batch_size must be in 1..{num_examples} (the number of examples), got {batch_size}")
    per_epoch = num_examples // batch_size
    epoch, position = divmod(int(step), per_epoch)
    permutation = np.random.default_rng([int(seed), epoch]).permutation(num_examples)
    return permutation[position * batch_size: (position + 1) * batch_size]


def take(arrays: dict, indices: np.ndarray) -> dict:
    """The rows `indices` of every array in the dict (a batch)."""
    return {k: v[indices] for k, v in arrays.items()}


def lm_arrays(tokens: np.ndarray, mask: np.ndarray) -> dict:
    """An LM batch: next-token loss on every real token after the first (`loss_mask[:, 0] = 0`)."""
    loss_mask = mask.copy()
    loss_mask[:, 0] = 0.0
    return {"tokens": tokens, "mask": mask, "loss_mask": loss_mask}


def query_arrays(tokenizer, queries: Sequence[Query], max_len: int) -> dict:
    """Queries as LM batches whose loss is only on the answer token: f = -log p(answer | prompt)."""
    texts = [f"{q.prompt} {q.answer}" for q in queries]
    tokens, mask = tokenizer.encode_batch(texts, max_len, bos=True, eos=False)
    loss_mask = np.zeros_like(mask)
    last = mask.sum(axis=1).astype(int) - 1
    loss_mask[np.arange(len(texts)), last] = 1.0
    return {"tokens": tokens, "mask": mask, "loss_mask": loss_mask}
