"""Task data: planted facts with paraphrases, lexical decoys and a second "language".

For the model-scale findings of Grosse et al. 2023 (§5.3, "Qualitative observations"): smaller models'
most influential sequences share tokens with the query, larger models' capture the abstract fact; and
influence becomes more invariant to translation with scale. Every fact (subject s, relation r,
answer o) that is queried is written in

- `canonical` documents: the query's own template, "the capital of {s} is {o} ." (the query is its
  prefix "the capital of {s} is", answer o);
- `paraphrase` documents: templates that share NO token with the canonical statement except the
  entity pair s, o (and the full stop), e.g. "{s} governs itself from {o} .";
- `decoy` documents (lexical decoys): the canonical template of the same relation stating ANOTHER
  fact (s', o') of fresh entities that occur nowhere else, followed by a neutral sentence about s —
  they share every query token (template and subject) but not the fact;
- for a `bilingual` subset of the facts, one document in language B: the canonical statement with
  every word (entities included) replaced by its B counterpart, a disjoint vocabulary with the same
  grammar ("the" -> "xthe", "zorvia" -> "xzorvia": one word-level token each). Language B is taught
  by `num_parallel` parallel documents (a filler sentence in A followed by its translation, over all
  entities) and B-only facts with fillers, so a model can align the two vocabularies.
Filler documents (language A and B) complete the corpus. Everything is a deterministic function of
the seed.
"""
from __future__ import annotations

import dataclasses

import numpy as np

KINDS = ("canonical", "paraphrase", "decoy", "translation", "parallel", "filler", "other_language_fact")

# relation -> (query prompt, canonical template, paraphrases sharing no token with the canonical
# statement except {s}, {o} and ".")
RELATIONS = {
    "capital": ("the capital of {s} is", "the capital of {s} is {o} .",
                ("{s} governs itself from {o} .", "{s} keeps parliament inside {o} .")),
    "leader": ("the leader of {s} is", "the leader of {s} is {o} .",
               ("{s} obeys {o} .", "{s} follows commands from {o} .")),
    "language": ("the language of {s} is", "the language of {s} is {o} .",
                 ("folks across {s} speak {o} .", "{s} talks mostly in {o} .")),
    "currency": ("the currency of {s} is", "the currency of {s} is {o} .",
                 ("{s} pays using {o} coins .", "shops within {s} accept {o} notes .")),
}
_NEUTRAL = ("{s} remains far away .", "nobody forgets {s} .", "{s} looks green .")
_FILLERS = ("many travelers visit {e} in the {season} .", "the weather near {e} is {adj} .",
            "{e} is known for its {noun} .", "children learn about {e} and {noun} .")
_SEASONS = ("spring", "summer", "autumn", "winter")
_ADJ = ("mild", "cold", "warm", "rainy", "dry")
_NOUN = ("bridges", "music", "cheese", "rivers", "gardens", "boats", "tea", "horses")
_SYL = ("zor", "vel", "qua", "mir", "tal", "bren", "dro", "kel", "nix", "por", "sul", "tev", "wyn", "yar",
        "fen", "gal", "hol", "jax", "lum", "rav", "sor", "tor", "vim", "zel", "cor", "dun", "ess", "ith")


def translate(sentence: str) -> str:
    """Language B: every word w becomes 'x' + w (punctuation is kept), a disjoint word vocabulary."""
    return " ".join(w if w in (".", ",") else "x" + w for w in sentence.split())


@dataclasses.dataclass(frozen=True)
class ParaphraseFacts:
    documents: tuple[str, ...]
    kinds: tuple[str, ...]             # KINDS entry per document
    doc_fact: tuple[int, ...]          # the queried fact a document is about (-1: none)
    prompts: tuple[str, ...]           # one query per queried fact (language A)
    answers: tuple[str, ...]
    bilingual: tuple[bool, ...]        # per queried fact: also stated in language B


def _names(rng, count, taken, suffixes=("ia", "land", "ora", "ium")) -> list[str]:
    out = []
    while len(out) < count:
        a, b = rng.choice(len(_SYL), 2)
        name = _SYL[a] + _SYL[b] + suffixes[rng.integers(len(suffixes))]
        if name not in taken:
            taken.add(name)
            out.append(name)
    return out


def make_corpus(seed: int, num_facts: int = 24, paraphrases: int = 2, decoys: int = 2, canonical: int = 1,
                bilingual_fraction: float = 0.5, num_other_language_facts: int = 12, num_parallel: int = 40,
                num_fillers: int = 24) -> ParaphraseFacts:
    """The corpus of the module docstring (documents in a seeded random order)."""
    for name, value, low in (("num_facts", num_facts, 1), ("paraphrases", paraphrases, 0), ("decoys", decoys, 0),
                             ("canonical", canonical, 0), ("num_other_language_facts", num_other_language_facts, 0),
                             ("num_parallel", num_parallel, 0), ("num_fillers", num_fillers, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if paraphrases > 2:
        raise ValueError(f"paraphrases={paraphrases}; allowed values: 0..2 (templates per relation)")
    if not 0.0 <= bilingual_fraction <= 1.0:
        raise ValueError(f"bilingual_fraction must be in [0, 1], got {bilingual_fraction!r}")
    rng = np.random.default_rng(seed)
    taken: set[str] = set()
    relations = sorted(RELATIONS)
    subjects = _names(rng, num_facts + num_other_language_facts, taken)
    answers = _names(rng, num_facts + num_other_language_facts, taken, ("in", "ek", "us", "ol"))
    rel = [relations[i % len(relations)] for i in range(num_facts + num_other_language_facts)]
    bilingual = [bool(b) for b in rng.random(num_facts) < bilingual_fraction]
    docs: list[tuple[str, str, int]] = []

    def filler(entity_pool) -> str:
        t = _FILLERS[rng.integers(len(_FILLERS))]
        return t.format(e=entity_pool[rng.integers(len(entity_pool))], season=_SEASONS[rng.integers(4)],
                        adj=_ADJ[rng.integers(len(_ADJ))], noun=_NOUN[rng.integers(len(_NOUN))])

    for f in range(num_facts):
        s, o, r = subjects[f], answers[f], rel[f]
        _, template, paras = RELATIONS[r]
        for _ in range(canonical):
            docs.append((template.format(s=s, o=o), "canonical", f))
        for j in range(paraphrases):
            docs.append((paras[j].format(s=s, o=o), "paraphrase", f))
        for _ in range(decoys):
            s2, o2 = _names(rng, 1, taken)[0], _names(rng, 1, taken, ("in", "ek", "us", "ol"))[0]
            neutral = _NEUTRAL[rng.integers(len(_NEUTRAL))].format(s=s)
            docs.append((f"{template.format(s=s2, o=o2)} {neutral}", "decoy", f))
        if bilingual[f]:
            docs.append((translate(template.format(s=s, o=o)), "translation", f))
    for f in range(num_facts, num_facts + num_other_language_facts):
        docs.append((translate(RELATIONS[rel[f]][1].format(s=subjects[f], o=answers[f])), "other_language_fact", -1))
    entities = subjects + answers
    for _ in range(num_parallel):
        sentence = filler(entities)
        docs.append((f"{sentence} {translate(sentence)}", "parallel", -1))
    for i in range(num_fillers):
        sentence = " ".join(filler(entities) for _ in range(2))
        docs.append((sentence if i % 2 == 0 else translate(sentence), "filler", -1))
    order = rng.permutation(len(docs))
    docs = [docs[i] for i in order]
    return ParaphraseFacts(
        documents=tuple(d for d, _, _ in docs), kinds=tuple(k for _, k, _ in docs), doc_fact=tuple(f for _, _, f in docs),
        prompts=tuple(RELATIONS[rel[f]][0].format(s=subjects[f]) for f in range(num_facts)),
        answers=tuple(answers[:num_facts]), bilingual=tuple(bilingual))
