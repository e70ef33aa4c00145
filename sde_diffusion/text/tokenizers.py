r"""Tokenizers that need no download: word-level (a vocabulary built from the training captions and stored
in the checkpoint) and byte-level (UTF-8 bytes).

Both turn prompts into ``ids [B, L]`` (int64) and ``mask [B, L]`` (bool, True = a real token) with
``L = max_length``. Every sequence starts with ``<bos>``, so the empty prompt (the "no caption" of
classifier-free guidance) is ``[<bos>]`` and never an all-padding row. Longer prompts are cut to
``max_length`` tokens with a warning.

Word level: lower-cased, split into runs of letters or digits (``"3 left of 8"`` → ``3, left, of, 8``).
Unknown words are an error that names them (``unknown="error"``, the default) or map to ``<unk>``
(``unknown="unk"``).
"""
from __future__ import annotations

import re
import warnings
from typing import Any, Dict, Iterable, List, Sequence, Tuple

import torch
from torch import Tensor

PAD, UNK, BOS = "<pad>", "<unk>", "<bos>"
SPECIALS = (PAD, UNK, BOS)
_WORD = re.compile(r"[a-z]+|[0-9]")
UNKNOWN_POLICIES = ("error", "unk")


def words(text: str) -> List[str]:
    """The word-level tokens of ``text``: lower-case runs of letters, and single digits."""
    return _WORD.findall(str(text).lower())


class Tokenizer:
    """The interface: ``encode(prompts) -> (ids [B, L], mask [B, L])``, ``vocab_size``, ``state()``."""

    kind = "base"
    max_length: int

    def token_ids(self, prompt: str) -> List[int]:
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def state(self) -> Dict[str, Any]:
        raise NotImplementedError

    def encode(self, prompts: Sequence[str]) -> Tuple[Tensor, Tensor]:
        if isinstance(prompts, str):
            prompts = [prompts]
        rows, cut = [], []
        for p in prompts:
            ids = [SPECIALS.index(BOS)] + self.token_ids(p)
            if len(ids) > self.max_length:
                cut.append(p)
                ids = ids[: self.max_length]
            rows.append(ids)
        if cut:
            warnings.warn(f"{len(cut)} prompt(s) longer than {self.max_length - 1} tokens were cut to fit "
                          f"(e.g. {cut[0]!r}); the text encoder reads at most {self.max_length} tokens", stacklevel=2)
        ids = torch.zeros(len(rows), self.max_length, dtype=torch.long)
        mask = torch.zeros(len(rows), self.max_length, dtype=torch.bool)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = True
        return ids, mask


class WordTokenizer(Tokenizer):
    """Words of a fixed vocabulary (``SPECIALS`` first), e.g. built by :meth:`from_captions`."""

    kind = "word"

    def __init__(self, vocab: Sequence[str], max_length: int = 16, unknown: str = "error") -> None:
        vocab = list(vocab)
        if vocab[: len(SPECIALS)] != list(SPECIALS):
            vocab = list(SPECIALS) + [w for w in vocab if w not in SPECIALS]
        if unknown not in UNKNOWN_POLICIES:
            raise ValueError(f"unknown-word policy {unknown!r}; choose one of: {', '.join(UNKNOWN_POLICIES)}")
        if int(max_length) < 2:
            raise ValueError(f"max_length must be at least 2 (<bos> and one word), got {max_length}")
        self.vocab, self.max_length, self.unknown = vocab, int(max_length), unknown
        self.index = {w: i for i, w in enumerate(vocab)}

    @classmethod
    def from_captions(cls, captions: Iterable[str], max_length: int = 16, unknown: str = "error") -> "WordTokenizer":
        """The sorted vocabulary of every word in ``captions``."""
        found = sorted({w for c in captions for w in words(c)})
        return cls(list(SPECIALS) + found, max_length, unknown)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def token_ids(self, prompt: str) -> List[int]:
        toks = words(prompt)
        missing = sorted({w for w in toks if w not in self.index})
        if missing and self.unknown == "error":
            known = ", ".join(w for w in self.vocab[len(SPECIALS):][:40])
            raise ValueError(f"prompt {prompt!r} has words the model's tokenizer never saw in training: "
                             f"{', '.join(missing)}. Known words: {known}"
                             f"{' …' if len(self.vocab) - len(SPECIALS) > 40 else ''}")
        unk = self.index[UNK]
        return [self.index.get(w, unk) for w in toks]

    def state(self) -> Dict[str, Any]:
        return {"kind": self.kind, "vocab": list(self.vocab), "max_length": self.max_length, "unknown": self.unknown}


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes shifted past the special tokens: a vocabulary of 256 + 3, no unknown input."""

    kind = "byte"

    def __init__(self, max_length: int = 64) -> None:
        if int(max_length) < 2:
            raise ValueError(f"max_length must be at least 2, got {max_length}")
        self.max_length = int(max_length)

    @property
    def vocab_size(self) -> int:
        return 256 + len(SPECIALS)

    def token_ids(self, prompt: str) -> List[int]:
        return [b + len(SPECIALS) for b in str(prompt).encode("utf-8")]

    def state(self) -> Dict[str, Any]:
        return {"kind": self.kind, "max_length": self.max_length}


def tokenizer_from_state(state: Dict[str, Any]) -> Tokenizer:
    """Rebuild a tokenizer from :meth:`Tokenizer.state` (as a checkpoint stores it)."""
    kind = state.get("kind")
    if kind == "word":
        return WordTokenizer(state["vocab"], state["max_length"], state.get("unknown", "error"))
    if kind == "byte":
        return ByteTokenizer(state["max_length"])
    raise ValueError(f"unknown tokenizer kind {kind!r} in the checkpoint; known: word, byte")


__all__ = ["PAD", "UNK", "BOS", "SPECIALS", "words", "Tokenizer", "WordTokenizer", "ByteTokenizer",
           "tokenizer_from_state", "UNKNOWN_POLICIES"]
