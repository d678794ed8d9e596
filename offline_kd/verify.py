"""`kd inspect` summary and `kd verify` checks of a signal store."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .store import SignalStore, StoreCorruptionError, array_specs, shard_range


def inspect_store(url: str, storage_options: dict | None = None) -> dict:
    """Summary of a store. Keys: sequences, tokens, top_k, views, vocab_size, teacher, complete,
    bytes, bytes_per_token, plus extras (max_length, temperatures, hidden, shards, ...)."""
    s = SignalStore.open(url, storage_options=storage_options)
    m = s.meta
    committed = s.committed()
    try:
        tokens = int(s.read(0, 0, m.num_sequences, fields=["lengths"])["lengths"].sum())
    except StoreCorruptionError:
        tokens = None
    nbytes = s.nbytes_stored()
    return {
        "sequences": m.num_sequences,
        "tokens": tokens,
        "top_k": m.top_k,
        "views": m.views,
        "vocab_size": m.vocab_size,
        "teacher": m.teacher,
        "complete": bool(committed.all()),
        "bytes": nbytes,
        "bytes_per_token": (nbytes / tokens) if tokens else None,
        "url": str(url),
        "max_length": m.max_length,
        "temperatures": m.temperatures,
        "hidden": m.hidden,
        "hidden_size": m.hidden_size,
        "shards": m.num_shards,
        "committed_shards": int(committed.sum()),
        "shard_sequences": m.shard_sequences,
        "chunk_sequences": m.chunk_sequences,
        "tokenizer_sha256": m.tokenizer_sha256,
        "masking": m.masking,
        "seed": m.seed,
        "corpus": m.corpus,
    }


def format_summary(info: dict) -> str:
    t = info["teacher"]
    bpt = info["bytes_per_token"]
    lines = [
        f"signal store   {info['url']}",
        f"teacher        {t.get('name_or_path')} ({t.get('model_type')}, {t.get('num_hidden_layers')} layers, "
        f"hidden {t.get('hidden_size')}), weights sha256 {str(t.get('weights_sha256'))[:16]}…",
        f"sequences      {info['sequences']:,} × {info['max_length']} ({info['tokens']:,} real tokens)"
        if info["tokens"] is not None
        else f"sequences      {info['sequences']:,} × {info['max_length']}",
        f"signals        top-{info['top_k']}, {info['views']} view(s), T = {info['temperatures']}, "
        f"hidden {'yes' if info['hidden'] else 'no'}, vocab {info['vocab_size']:,}",
        f"shards         {info['committed_shards']}/{info['shards']} committed "
        f"({info['shard_sequences']} sequences each) -> {'complete' if info['complete'] else 'INCOMPLETE'}",
        f"size           {info['bytes'] / 1e6:,.2f} MB" + (f", {bpt:,.1f} bytes/token" if bpt else ""),
    ]
    return "\n".join(lines)


@dataclass
class VerifyReport:
    url: str
    errors: list[str] = field(default_factory=list)
    checked_shards: int = 0
    complete: bool = False
    teacher_max_abs_diff: dict | None = None
    sampled_sequences: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def as_dict(self) -> dict:
        return {
            "url": self.url,
            "ok": self.ok,
            "errors": list(self.errors),
            "checked_shards": self.checked_shards,
            "complete": self.complete,
            "teacher_max_abs_diff": self.teacher_max_abs_diff,
            "sampled_sequences": self.sampled_sequences,
            "notes": list(self.notes),
        }


def _check_block(s: SignalStore, view: int, a: int, d: dict, errors: list[str], tol: float = 1e-4) -> None:
    m = s.meta
    L = m.max_length
    lengths = d["lengths"]
    real = np.arange(L)[None] < lengths[:, None]

    def bad(what: str, rows: np.ndarray):
        seq = a + int(np.flatnonzero(rows)[0])
        errors.append(f"view {view}, sequence {seq}: {what}")

    if np.any((lengths < 0) | (lengths > L)):
        bad(f"length outside [0, {L}]", (lengths < 0) | (lengths > L))
    for name in ("input_ids", "masked_input_ids"):
        if name in d:
            over = (d[name].astype(np.int64) >= m.vocab_size).any(axis=-1)
            if over.any():
                bad(f"{name} has ids >= vocab size {m.vocab_size}", over)
    ids = d["topk_ids"].astype(np.int64)
    over = ((ids >= m.vocab_size) & real[..., None]).any(axis=(1, 2))
    if over.any():
        bad(f"topk_ids has ids >= vocab size {m.vocab_size}", over)
    for name in (spec.name for spec in array_specs(m) if np.dtype(spec.dtype_for(m)).kind == "f"):
        if name in d:
            nonfinite = ~np.isfinite(d[name].astype(np.float32)).all(axis=tuple(range(1, d[name].ndim)))
            if nonfinite.any():
                bad(f"{name} has NaN/inf", nonfinite)
    lg = d["topk_logits"]
    unsorted = ((np.diff(lg, axis=-1) > 0).any(axis=-1) & real).any(axis=1)
    if unsorted.any():
        bad("topk_logits not sorted by descending logit", unsorted)
    with np.errstate(invalid="ignore"):
        for t, T in enumerate(m.temperatures):
            low = ((d["lse"][..., t] < lg[..., 0] / T - tol * max(1.0, 1.0 / T)) & real).any(axis=1)
            if low.any():
                bad(f"lse at T={T} below the max top-k logit / T", low)
    outside = (d["mlm_mask"] & ~real).any(axis=1)
    if outside.any():
        bad("mlm_mask selects padding", outside)
    changed = ((d["masked_input_ids"] != d["input_ids"]) & ~d["mlm_mask"]).any(axis=1)
    if changed.any():
        bad("masked_input_ids differs from input_ids outside the mlm_mask", changed)


def verify_store(
    url: str,
    teacher: str | None = None,
    sample: int = 0,
    device: str | None = None,
    dtype: str = "float32",
    tolerance: float = 1e-3,
    storage_options: dict | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
) -> VerifyReport:
    """Decode every chunk (crc32c), check value ranges and completeness; optionally rerun the teacher."""
    s = SignalStore.open(url, storage_options=storage_options)
    if teacher is not None:  # refused before the (long) decode of every chunk
        from .inputs import check_device, check_model_source

        check_device(device)
        label = f"--teacher {teacher}"
        check_model_source(teacher, label, revision=revision, trust_remote_code=trust_remote_code)
    m = s.meta
    rep = VerifyReport(url=str(url))
    try:
        committed = s.committed()
    except StoreCorruptionError as e:
        rep.errors.append(str(e))
        committed = np.zeros(m.num_shards, dtype=bool)
    rep.complete = bool(committed.all())
    if not rep.complete:
        missing = np.flatnonzero(~committed).tolist()
        rep.errors.append(f"incomplete: {len(missing)} shard(s) not committed: {missing[:20]}")
    input_fields = [spec.name for spec in array_specs(m, per_view=False)]
    view_fields = [spec.name for spec in array_specs(m, per_view=True)]
    needed = set(s.fields) - {"hidden"}  # _check_block needs every array but hidden (checked if read)
    for shard in range(m.num_shards):
        a, b = shard_range(m, shard)
        inputs = {}
        for name in input_fields:
            try:
                inputs[name] = s.read(0, a, b, fields=[name])[name]
            except StoreCorruptionError as e:
                rep.errors.append(str(e))
        for view in range(m.views):
            d = dict(inputs)
            for name in view_fields:
                try:
                    d[name] = s.read(view, a, b, fields=[name])[name]
                except StoreCorruptionError as e:
                    rep.errors.append(str(e))
            if needed <= set(d):
                _check_block(s, view, a, d, rep.errors)
        rep.checked_shards += 1
    if teacher is not None and sample > 0:
        _teacher_check(s, rep, teacher, sample, device, dtype, tolerance, trust_remote_code, revision)
    return rep


def _teacher_check(s, rep, teacher_name, sample, device, dtype, tolerance, trust_remote_code, revision):
    import torch

    from .teacher import compute_signals, load_teacher

    m = s.meta
    t = load_teacher(
        teacher_name,
        revision=revision,
        device=device or "cpu",
        dtype=dtype,
        trust_remote_code=trust_remote_code,
    )
    if t.tokenizer_sha256 != m.tokenizer_sha256:
        rep.errors.append(f"teacher {teacher_name!r} has a different tokenizer than the store")
        return
    if t.weights_sha256 != m.teacher.get("weights_sha256"):
        rep.notes.append(f"teacher {teacher_name!r} weights differ from the store's (sha256)")
    rng = np.random.default_rng(0)
    seqs = np.sort(rng.choice(m.num_sequences, size=min(sample, m.num_sequences), replace=False))
    rep.sampled_sequences = seqs.tolist()
    diffs = {"topk_logits": 0.0, "lse": 0.0}
    if m.hidden:
        diffs["hidden"] = 0.0
    L = m.max_length
    for i in seqs:
        view = int(i) % m.views
        d = s.read(view, int(i), int(i) + 1)
        attn = (np.arange(L)[None] < d["lengths"][:, None]).astype(np.int64)
        sig = compute_signals(
            t.model, torch.from_numpy(d["masked_input_ids"].astype(np.int64)), torch.from_numpy(attn),
            m.top_k, m.temperatures, m.hidden, seq_offset=int(i),
        )  # fmt: skip
        seq_diff = {
            "topk_logits": float(np.abs(sig.topk_logits - d["topk_logits"]).max()),
            "lse": float(np.abs(sig.lse - d["lse"]).max()),
        }
        if m.hidden:
            seq_diff["hidden"] = float(
                np.abs(sig.hidden.astype(np.float32) - d["hidden"].astype(np.float32)).max()
            )
        for k, v in seq_diff.items():
            diffs[k] = max(diffs[k], v)
        worst = max(seq_diff["topk_logits"], seq_diff["lse"])
        if worst > tolerance:
            rep.errors.append(
                f"view {view}, sequence {int(i)}: teacher rerun differs from the stored signals by {worst:.3g} "
                f"(> tolerance {tolerance})"
            )
    rep.teacher_max_abs_diff = diffs
