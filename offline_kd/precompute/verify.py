"""`kd inspect` summary and `kd verify` checks of a signal store."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from offline_kd.runtime.settings import VerifyConfig
from offline_kd.store.signal_store import SignalStore, StoreCorruptionError, array_specs, shard_range
from offline_kd.store.storage import check_store_url


def inspect_store(url: str, storage_options: dict | None = None) -> dict:
    """Summary of a store. Keys: sequences, tokens, top_k, views, vocab_size, teacher, complete,
    bytes, bytes_per_token, plus extras (max_length, temperatures, hidden, shards, ...)."""
    check_store_url(url, storage_options)
    s = SignalStore.open(url, storage_options=storage_options)
    m = s.meta
    committed = s.committed()
    try:
        tokens = int(s.read(0, 0, m.num_sequences, fields=["lengths"])["lengths"].sum())
    except StoreCorruptionError:
        tokens = None
    nbytes = s.nbytes_stored()
    return {
        "format_version": m.format_version,
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
        "hidden_dtype": m.hidden_dtype if m.hidden else None,
        "kl_sources": m.kl_sources(),
        "digests": bool(m.digests),  # each commit recorded its chunks' crc32c (kd verify checks them)
        # A store with hidden states but no head (format 1, --no-store-head) can still train in exact
        # mode with the head of the --teacher it was made with.
        "exact_needs_teacher": bool(m.hidden and not m.has_head),
        "teacher_head": m.teacher_head or None,
        "head_bytes": s.head_nbytes_stored(),
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
        f"signals        {_signals(info)}, {info['views']} view(s), vocab {info['vocab_size']:,}",
        f"KL sources     {_kl_sources(info)}",
        f"shards         {info['committed_shards']}/{info['shards']} committed "
        f"({info['shard_sequences']} sequences each) -> {'complete' if info['complete'] else 'INCOMPLETE'}",
        f"size           {info['bytes'] / 1e6:,.2f} MB" + (f", {bpt:,.1f} bytes/token" if bpt else ""),
    ]
    return "\n".join(lines)


def _signals(info: dict) -> str:
    topk = f"top-{info['top_k']}, T = {info['temperatures']}" if info["top_k"] else "no top-k (--top-k 0)"
    hidden = f"hidden {info['hidden_dtype']}" if info["hidden"] else "no hidden"
    head = ", teacher head" if info["teacher_head"] else ""
    return f"{topk}, {hidden}{head}"


def _kl_sources(info: dict) -> str:
    names = {"topk": "topk (top-k + tail)", "exact": "exact (stored hidden through the stored head)"}
    parts = [names[k] for k in info["kl_sources"]]
    if info["exact_needs_teacher"]:
        parts.append("exact with --teacher (no stored head)")
    return ", ".join(parts) or "none"


@dataclass
class VerifyReport:
    url: str
    errors: list[str] = field(default_factory=list)
    checked_shards: int = 0
    complete: bool = False
    teacher_max_abs_diff: dict | None = None
    exact: dict | None = None  # kd verify --exact figures (offline_kd.precompute.verify_exact)
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
            "exact": self.exact,
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
    for name in ("topk_logits", "lse", "hidden"):
        if name in d:
            values = _as_float32(m, name, d[name])
            nonfinite = ~np.isfinite(values).all(axis=tuple(range(1, values.ndim)))
            if nonfinite.any():
                bad(f"{name} has NaN/inf", nonfinite)
    if m.top_k > 0:
        _check_topk(m, d, real, bad, tol)
    outside = (d["mlm_mask"] & ~real).any(axis=1)
    if outside.any():
        bad("mlm_mask selects padding", outside)
    changed = ((d["masked_input_ids"] != d["input_ids"]) & ~d["mlm_mask"]).any(axis=1)
    if changed.any():
        bad("masked_input_ids differs from input_ids outside the mlm_mask", changed)


def _as_float32(m, name: str, values: np.ndarray) -> np.ndarray:
    """A float array as float32 (hidden states decoded from their stored bits)."""
    if name == "hidden":
        from offline_kd.store.hidden_dtype import decode

        return decode(values, m.hidden_dtype).float().numpy()
    return values.astype(np.float32, copy=False)


def _check_topk(m, d: dict, real: np.ndarray, bad, tol: float) -> None:
    ids = d["topk_ids"].astype(np.int64)
    over = ((ids >= m.vocab_size) & real[..., None]).any(axis=(1, 2))
    if over.any():
        bad(f"topk_ids has ids >= vocab size {m.vocab_size}", over)
    lg = d["topk_logits"]
    unsorted = ((np.diff(lg, axis=-1) > 0).any(axis=-1) & real).any(axis=1)
    if unsorted.any():
        bad("topk_logits not sorted by descending logit", unsorted)
    with np.errstate(invalid="ignore"):
        for t, T in enumerate(m.temperatures):
            low = ((d["lse"][..., t] < lg[..., 0] / T - tol * max(1.0, 1.0 / T)) & real).any(axis=1)
            if low.any():
                bad(f"lse at T={T} below the max top-k logit / T", low)


def verify_store(url: str, cfg: VerifyConfig | None = None) -> VerifyReport:
    """Decode every chunk (crc32c), check value ranges and completeness; optionally rerun the
    teacher (``cfg.teacher``) and recompute the logits through the stored head (``cfg.exact``) on
    ``cfg.sample`` sequences."""
    cfg = cfg or VerifyConfig()
    teacher, device, storage_options = cfg.teacher, cfg.device, cfg.storage_options
    revision, trust_remote_code = cfg.revision, cfg.trust_remote_code
    check_store_url(url, storage_options)
    s = SignalStore.open(url, storage_options=storage_options)
    if teacher is not None:  # refused before the (long) decode of every chunk
        from offline_kd.runtime.checks import check_device, check_model_source

        check_device(device)
        label = f"--teacher {teacher}"
        check_model_source(teacher, label, revision=revision, trust_remote_code=trust_remote_code)
    m = s.meta
    rep = VerifyReport(url=str(url))
    # The head first: a store --exact cannot check is a usage error, raised before decoding anything.
    head = _exact_head(s, teacher, device, revision, trust_remote_code) if cfg.exact else None
    try:
        committed = s.committed()
        unreadable_record = False
    except StoreCorruptionError as e:
        rep.errors.append(str(e))
        committed = np.zeros(m.num_shards, dtype=bool)
        unreadable_record = True
    rep.complete = bool(committed.all())
    if not rep.complete and not unreadable_record:
        missing = np.flatnonzero(~committed).tolist()
        rep.errors.append(f"incomplete: {len(missing)} shard(s) not committed: {missing[:20]}")
        rep.notes.append(
            f"uncommitted shard(s) {missing[:20]} are not yet written (rerun precompute to finish them): "
            "their contents are not checked"
        )
    if not m.digests:
        rep.notes.append(
            "the store records no chunk digests (it was written before them): each chunk is checked against "
            "its own crc32c, not for being the one committed in its place"
        )
    for shard in range(m.num_shards):
        if not committed[shard] and not unreadable_record:
            continue  # half-written by a writer that stopped: not corrupt, just not finished
        _check_shard(s, shard, rep.errors)
        rep.checked_shards += 1
    _sample_checks(s, rep, cfg, head)
    return rep


def _sample_checks(s: SignalStore, rep: VerifyReport, cfg: VerifyConfig, head) -> None:
    """The teacher rerun (``cfg.teacher``) and the exact check (``head``) on ``cfg.sample`` sequences."""
    if cfg.sample <= 0:
        return
    try:
        if cfg.teacher is not None:
            _teacher_check(
                s, rep, cfg.teacher, cfg.sample, cfg.device, cfg.dtype, cfg.tolerance, cfg.trust_remote_code,
                cfg.revision,
            )  # fmt: skip
        if head is not None:
            _exact_check(s, rep, head, cfg.sample)
    except StoreCorruptionError as e:  # a sampled sequence in a chunk named above: one report, not a crash
        if str(e) not in rep.errors:
            rep.errors.append(str(e))


def _check_shard(s: SignalStore, shard: int, errors: list[str]) -> None:
    """Decode every array of ``shard`` in every view (each chunk against its crc32c and against the
    digests of the shard's commit) and check its values."""
    m = s.meta
    a, b = shard_range(m, shard)
    needed = set(s.fields) - {"hidden"}  # _check_block needs every array but hidden (checked if read)

    def read(view: int, name: str, into: dict) -> None:
        try:
            into[name] = s.read(view, a, b, fields=[name])[name]
        except StoreCorruptionError as e:
            if str(e) not in errors:  # a missing digest record fails every array of the shard alike
                errors.append(str(e))

    inputs: dict = {}
    for spec in array_specs(m, per_view=False):
        read(0, spec.name, inputs)
    for view in range(m.views):
        d = dict(inputs)
        for spec in array_specs(m, per_view=True):
            read(view, spec.name, d)
        if needed <= set(d):
            _check_block(s, view, a, d, errors)


def _exact_head(s: SignalStore, teacher, device, revision, trust_remote_code):
    """The head ``--exact`` recomputes the logits with: the stored one, else ``teacher``'s."""
    from offline_kd.store.signal_store import StoreError
    from offline_kd.teacher.model import resolve_head

    if not s.meta.hidden:
        raise StoreError(f"{s.url!r} has no hidden states: --exact has nothing to recompute the logits from")
    return resolve_head(
        s, teacher, device=device or "cpu", revision=revision, trust_remote_code=trust_remote_code
    )


def _exact_check(s: SignalStore, rep: VerifyReport, head, sample: int) -> None:
    from offline_kd.precompute.verify_exact import exact_check, sample_sequences

    if s.meta.top_k == 0:
        rep.notes.append(
            "--exact: the store keeps no top-k signals to compare the recovered logits with (--top-k 0); "
            "the head was rebuilt and matched its sha256"
        )
        return
    seqs = sample_sequences(s.meta.num_sequences, sample)
    rep.sampled_sequences = sorted(set(rep.sampled_sequences) | set(seqs.tolist()))
    rep.exact, errors = exact_check(s, head, seqs)
    rep.errors.extend(errors)


def _teacher_check(s, rep, teacher_name, sample, device, dtype, tolerance, trust_remote_code, revision):
    import torch

    from offline_kd.precompute.verify_exact import sample_sequences
    from offline_kd.teacher.model import compute_signals, load_teacher

    m = s.meta
    t = load_teacher(
        teacher_name,
        revision=revision,
        device=device or "cpu",
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        hub_kernels=bool((m.teacher or {}).get("hub_kernels", False)),  # as the store's teacher ran
    )
    if t.tokenizer_sha256 != m.tokenizer_sha256:
        rep.errors.append(f"teacher {teacher_name!r} has a different tokenizer than the store")
        return
    if t.weights_sha256 != m.teacher.get("weights_sha256"):
        rep.notes.append(f"teacher {teacher_name!r} weights differ from the store's (sha256)")
    seqs = sample_sequences(m.num_sequences, sample)
    rep.sampled_sequences = seqs.tolist()
    compared = (["topk_logits", "lse"] if m.top_k > 0 else []) + (["hidden"] if m.hidden else [])
    diffs = dict.fromkeys(compared, 0.0)
    L = m.max_length
    for i in seqs:
        view = int(i) % m.views
        d = s.read(view, int(i), int(i) + 1)
        attn = (np.arange(L)[None] < d["lengths"][:, None]).astype(np.int64)
        sig = compute_signals(
            t.model, torch.from_numpy(d["masked_input_ids"].astype(np.int64)), torch.from_numpy(attn),
            m.top_k, m.temperatures, m.hidden, seq_offset=int(i), hidden_dtype=m.hidden_dtype,
        )  # fmt: skip
        seq_diff = {
            name: float(
                np.abs(_as_float32(m, name, getattr(sig, name)) - _as_float32(m, name, d[name])).max()
            )
            for name in compared
        }
        for k, v in seq_diff.items():
            diffs[k] = max(diffs[k], v)
        worst = max((seq_diff[k] for k in ("topk_logits", "lse") if k in seq_diff), default=0.0)
        if worst > tolerance:
            rep.errors.append(
                f"view {view}, sequence {int(i)}: teacher rerun differs from the stored signals by {worst:.3g} "
                f"(> tolerance {tolerance})"
            )
    rep.teacher_max_abs_diff = diffs
