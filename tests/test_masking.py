"""Deterministic masking: depends only on (seed, sequence, view); specials and padding never chosen."""

from __future__ import annotations

import numpy as np
import pytest

from offline_kd.data.masking import MaskingConfig, mask_batch, mask_sequence, smoothing_weights

SPECIAL = [0, 1, 2, 3, 4]  # pad, unk, cls, sep, mask
VOCAB = 100


def make_batch(n=16, L=64, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, VOCAB, size=(n, L))
    lengths = rng.integers(20, L + 1, size=n)
    for i, n_ in enumerate(lengths):
        ids[i, 0] = 2
        ids[i, n_ - 1] = 3
        ids[i, n_ // 2] = 3
        ids[i, n_:] = 0
    return ids, lengths


def test_deterministic_and_independent_of_batching():
    ids, lengths = make_batch()
    cfg = MaskingConfig()
    a, ma = mask_batch(ids, lengths, cfg, SPECIAL, VOCAB, 4, seed=7, seq_indices=range(100, 116), view=1)
    b, mb = mask_batch(
        ids[5:9], lengths[5:9], cfg, SPECIAL, VOCAB, 4, seed=7, seq_indices=range(105, 109), view=1
    )
    np.testing.assert_array_equal(a[5:9], b)
    np.testing.assert_array_equal(ma[5:9], mb)
    c, mc = mask_sequence(ids[0], lengths[0], cfg, SPECIAL, VOCAB, 4, seed=7, seq_index=100, view=1)
    np.testing.assert_array_equal(c, a[0])
    # a different view, seed or index gives a different mask
    d, md = mask_sequence(ids[0], lengths[0], cfg, SPECIAL, VOCAB, 4, seed=7, seq_index=100, view=0)
    e, me = mask_sequence(ids[0], lengths[0], cfg, SPECIAL, VOCAB, 4, seed=8, seq_index=100, view=1)
    assert not np.array_equal(md, ma[0]) and not np.array_equal(me, ma[0])


def test_rates_specials_and_padding():
    ids, lengths = make_batch(n=400, L=64, seed=1)
    cfg = MaskingConfig()
    masked, mlm = mask_batch(ids, lengths, cfg, SPECIAL, VOCAB, 4, seed=0, seq_indices=range(400), view=0)
    pos = np.arange(64)[None]
    assert not (mlm & (pos >= lengths[:, None])).any()
    assert not (mlm & np.isin(ids, SPECIAL)).any()
    cand = ((pos < lengths[:, None]) & ~np.isin(ids, SPECIAL)).sum(1)
    np.testing.assert_array_equal(mlm.sum(1), np.ceil(0.15 * cand).astype(int))
    sel_in, sel_out = ids[mlm], masked[mlm]
    frac_mask = (sel_out == 4).mean()
    frac_keep = (sel_out == sel_in).mean()
    assert 0.76 < frac_mask < 0.84 and 0.07 < frac_keep < 0.14
    rand = sel_out[(sel_out != 4) & (sel_out != sel_in)]
    assert rand.size and not np.isin(rand, SPECIAL).any() and rand.max() < VOCAB
    np.testing.assert_array_equal(masked[~mlm], ids[~mlm])


def test_smoothing_prefers_rare_tokens():
    L = 200
    ids = np.full((1, L), 10)
    ids[0, ::10] = 50  # 10% rare token
    ids[0, 0] = 2
    counts = np.bincount(ids.ravel(), minlength=VOCAB)
    w = smoothing_weights(counts, 0.7)
    cfg = MaskingConfig(smoothing=0.7)
    rare_hits = []
    for s in range(50):
        _, m = mask_sequence(ids[0], L, cfg, SPECIAL, VOCAB, 4, seed=0, seq_index=s, view=0, token_weights=w)
        rare_hits.append((ids[0][m] == 50).mean())
    assert np.mean(rare_hits) > 0.3  # uniform selection would give ~0.1


def test_config_validation():
    with pytest.raises(ValueError):
        MaskingConfig(mask_prob=0.9, random_prob=0.2, keep_prob=0.1)
    with pytest.raises(ValueError):
        MaskingConfig(mlm_probability=0.0)
