"""A model2vec-style static embedder distilled from MiniLM: the fast, weaker baseline of
``bench.intents`` (closeloop itself does not use it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from processors.understand.embed import MiniLMEmbedder, unit_rows

STATIC_DIM = 256
STATIC_SIF = 1e-4  # model2vec's SIF coefficient over a Zipf-estimated token probability


class StaticEmbedder:
    """A model2vec-style static model: a sentence is the mean of its tokens' vectors.

    The table is distilled once from MiniLM (every vocabulary token embedded alone, PCA to
    ``STATIC_DIM``, SIF weights from a Zipf estimate of token frequency by vocabulary rank)
    and cached as ``<cache_dir>/minilm-static-<dim>.npy``.
    """

    def __init__(self, table: np.ndarray, tokenizer: Any) -> None:  # a tokenizers.Tokenizer
        self._table = table.astype(np.float32, copy=False)
        self._tok = tokenizer
        self.dim = int(table.shape[1])

    @classmethod
    def load_or_build(
        cls, cache_dir: Path, teacher: MiniLMEmbedder | None = None, dim: int = STATIC_DIM
    ) -> StaticEmbedder:
        teacher = teacher or MiniLMEmbedder()
        path = Path(cache_dir) / f"minilm-static-{dim}.npy"
        if path.exists():
            table = np.load(path)
        else:
            table = distill_static(teacher, dim)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp.npy")
            np.save(tmp, table)
            tmp.replace(path)  # atomic: a concurrent reader never sees half a table
        return cls(table, teacher.tokenizer)

    def embed(self, texts: list[str]) -> np.ndarray:
        encs = self._tok.encode_batch(list(texts), add_special_tokens=False)
        lens = np.fromiter((len(e.ids) for e in encs), dtype=np.int64, count=len(encs))
        flat = np.fromiter((i for e in encs for i in e.ids), dtype=np.int64, count=int(lens.sum()))
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        nonempty = lens > 0
        if flat.size:
            starts = np.concatenate([[0], np.cumsum(lens)[:-1]])[nonempty]
            out[nonempty] = np.add.reduceat(self._table[flat], starts, axis=0)
        out[~nonempty, 0] = 1.0  # empty text: a fixed unit row
        return unit_rows(out)


def distill_static(teacher: MiniLMEmbedder, dim: int = STATIC_DIM) -> np.ndarray:
    """Embed each vocabulary token alone ([CLS] tok [SEP]), PCA to ``dim``, SIF-weight by rank."""
    tok = teacher.tokenizer
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    vocab = tok.get_vocab_size()
    vecs = teacher.embed_ids([[cls_id, i, sep_id] for i in range(vocab)])
    centred = vecs - vecs.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    table = centred @ vt[:dim].T
    # BERT's WordPiece vocabulary is roughly frequency-ordered: rank stands in for frequency
    inv_rank = 1.0 / np.arange(1, vocab + 1)
    proba = inv_rank / inv_rank.sum()
    table *= (STATIC_SIF / (STATIC_SIF + proba))[:, None]
    return table.astype(np.float32)
