"""Deterministic MLM masking (DistilBERT style).

For each sequence, ``ceil(mlm_probability * n_candidates)`` positions are chosen without
replacement among the real, non-special tokens (uniformly, or with DistilBERT's rarity
smoothing: weight ∝ count(token)^-smoothing). Each chosen position becomes ``[MASK]`` with
probability ``mask_prob``, a random non-special token with ``random_prob``, and is kept otherwise.

The mask of (sequence ``s``, view ``v``) depends only on ``(seed, v, s)`` through
``np.random.default_rng([seed, v, s])``, so it is identical for any rank split, batch size or
resume point. Evaluation reuses :func:`mask_sequence` with its own seed.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from offline_kd.runtime.settings import PrecomputeConfig


@dataclass
class MaskingConfig:
    mlm_probability: float = PrecomputeConfig.mlm_probability
    mask_prob: float = 0.8
    random_prob: float = 0.1
    keep_prob: float = 0.1
    smoothing: float | None = None  # DistilBERT uses 0.7

    def __post_init__(self):
        if not 0.0 < self.mlm_probability <= 1.0:
            raise ValueError(f"mlm_probability must be in (0, 1], got {self.mlm_probability}")
        total = self.mask_prob + self.random_prob + self.keep_prob
        if abs(total - 1.0) > 1e-6 or min(self.mask_prob, self.random_prob, self.keep_prob) < 0:
            raise ValueError(f"mask/random/keep must be non-negative and sum to 1, got {total}")

    def as_dict(self) -> dict:
        return asdict(self)


def smoothing_weights(counts: np.ndarray, smoothing: float) -> np.ndarray:
    """DistilBERT's rarity weights: count^-smoothing (unseen tokens count as 1)."""
    c = np.maximum(np.asarray(counts, dtype=np.float64), 1.0)
    return c ** (-float(smoothing))


def weights_sha256(weights: np.ndarray | None) -> str | None:
    if weights is None:
        return None
    return hashlib.sha256(np.ascontiguousarray(weights, dtype="<f8").tobytes()).hexdigest()


def _random_pool(special_ids: Iterable[int], vocab_size: int) -> np.ndarray:
    special = np.zeros(vocab_size, dtype=bool)
    ids = [i for i in special_ids if i is not None and 0 <= i < vocab_size]
    special[ids] = True
    return np.flatnonzero(~special)


def mask_sequence(
    input_ids: np.ndarray,
    length: int,
    config: MaskingConfig,
    special_ids: Sequence[int],
    vocab_size: int,
    mask_token_id: int,
    seed: int,
    seq_index: int,
    view: int,
    token_weights: np.ndarray | None = None,
    _pool: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Mask one sequence. Returns ``(masked_ids, mlm_mask)``; padding and specials never selected."""
    ids = np.asarray(input_ids)
    rng = np.random.default_rng([int(seed), int(view), int(seq_index)])
    masked = ids.copy()
    mlm = np.zeros(ids.shape[0], dtype=bool)
    pos = np.arange(min(int(length), ids.shape[0]))
    specials = np.asarray([i for i in special_ids if i is not None], dtype=np.int64)
    cand = pos[~np.isin(ids[pos], specials)]
    if cand.size == 0:
        return masked, mlm
    n = min(cand.size, max(1, math.ceil(config.mlm_probability * cand.size)))
    if token_weights is None:
        chosen = rng.choice(cand, size=n, replace=False)
    else:
        w = np.asarray(token_weights, dtype=np.float64)[ids[cand]]
        chosen = rng.choice(cand, size=n, replace=False, p=w / w.sum())
    chosen = np.sort(chosen)
    mlm[chosen] = True
    u = rng.random(chosen.size)
    pool = _pool if _pool is not None else _random_pool(special_ids, vocab_size)
    rand_tokens = pool[rng.integers(0, pool.size, size=chosen.size)]
    to_mask = u < config.mask_prob
    to_rand = (u >= config.mask_prob) & (u < config.mask_prob + config.random_prob)
    masked[chosen[to_mask]] = mask_token_id
    masked[chosen[to_rand]] = rand_tokens[to_rand]
    return masked, mlm


def mask_batch(
    input_ids: np.ndarray,
    lengths: np.ndarray,
    config: MaskingConfig,
    special_ids: Sequence[int],
    vocab_size: int,
    mask_token_id: int,
    seed: int,
    seq_indices: Sequence[int],
    view: int,
    token_weights: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Mask a batch ``[n, L]``; row ``i`` is sequence ``seq_indices[i]`` of the corpus."""
    pool = _random_pool(special_ids, vocab_size)
    masked = np.empty_like(input_ids)
    mlm = np.zeros(input_ids.shape, dtype=bool)
    for i, s in enumerate(seq_indices):
        masked[i], mlm[i] = mask_sequence(
            input_ids[i], int(lengths[i]), config, special_ids, vocab_size, mask_token_id,
            seed, int(s), view, token_weights, _pool=pool,
        )  # fmt: skip
    return masked, mlm
