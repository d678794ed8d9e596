"""Load a Hugging Face masked-LM teacher safely, fingerprint it, and compute its signals."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from offline_kd.runtime.hub_kernels import load_kwargs as hub_kernel_kwargs
from offline_kd.teacher.errors import TeacherError, TeacherFailed
from offline_kd.teacher.head import GROUP, MLMHead, check_head_fits, extract_head, head_group, load_head
from offline_kd.teacher.signals import extract_signals

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.h5", "*.msgpack")
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


@dataclass
class Teacher:
    model: torch.nn.Module
    tokenizer: object
    name_or_path: str
    revision: str | None
    weights_sha256: str
    tokenizer_sha256: str
    vocab_size: int
    device: torch.device
    dtype: torch.dtype
    info: dict = field(default_factory=dict)
    head: object | None = None  # offline_kd.teacher.head.HeadSpec, fp32 (load_teacher(head=True))
    head_error: str | None = None  # why the head could not be extracted
    hub_kernels: bool = False  # transformers may have replaced layers with hub kernels (--hub-kernels)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    def special_ids(self) -> list[int]:
        return sorted(set(int(i) for i in self.tokenizer.all_special_ids if i is not None))

    def provenance(self) -> dict:
        cfg = self.model.config
        return {
            "name_or_path": self.name_or_path,
            "revision": self.revision,
            "weights_sha256": self.weights_sha256,
            "model_type": getattr(cfg, "model_type", None),
            "hidden_size": int(cfg.hidden_size),
            "num_hidden_layers": int(getattr(cfg, "num_hidden_layers", 0) or 0),
            "hub_kernels": self.hub_kernels,
        }

    def tokenizer_info(self) -> dict:
        tok = self.tokenizer
        return {
            "sha256": self.tokenizer_sha256,
            "vocab_size": self.vocab_size,
            "cls_token_id": tok.cls_token_id,
            "sep_token_id": tok.sep_token_id,
            "pad_token_id": tok.pad_token_id,
            "mask_token_id": tok.mask_token_id,
            "unk_token_id": tok.unk_token_id,
            "special_ids": self.special_ids(),
        }


def _sha256_files(paths: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths, key=lambda q: q.name):
        h.update(p.name.encode() + b"\x00")
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def state_dict_sha256(model: torch.nn.Module) -> str:
    """Hash of the state dict (names, dtypes, shapes, bytes) in sorted name order."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def tokenizer_sha256(tokenizer, directory: Path | None = None) -> str:
    """Hash of the sorted vocabulary and special tokens (independent of file layout)."""
    h = hashlib.sha256()
    vocab = tokenizer.get_vocab()
    for tok, i in sorted(vocab.items(), key=lambda kv: (kv[1], kv[0])):
        h.update(f"{i}\t{tok}\n".encode())
    h.update(repr(sorted((k, str(v)) for k, v in tokenizer.special_tokens_map.items())).encode())
    h.update(type(tokenizer).__name__.encode())
    lower = getattr(tokenizer, "do_lower_case", None)
    h.update(f"lower={lower}".encode())
    return h.hexdigest()


def _resolve_dir(name_or_path: str, revision: str | None) -> Path | None:
    p = Path(name_or_path)
    if p.is_dir():
        return p
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name_or_path, revision=revision, local_files_only=True))
    except Exception:  # noqa: BLE001 - fall back to hashing the state dict
        return None


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in table:
        raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
    return table[dtype]


def _check_tokenizer(tok, name_or_path: str) -> None:
    if not getattr(tok, "is_fast", False):
        raise TeacherError(f"{name_or_path!r}: a fast tokenizer is required")
    if tok.mask_token_id is None:
        raise TeacherError(f"{name_or_path!r}: the tokenizer has no mask token")


def load_teacher_shape(name_or_path: str, revision: str | None = None, trust_remote_code: bool = False):
    """The teacher's model config and fast tokenizer, without its weights: ``(config, tokenizer)``."""
    from transformers import AutoConfig, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(
            name_or_path, revision=revision, trust_remote_code=trust_remote_code
        )
        tok = AutoTokenizer.from_pretrained(
            name_or_path, revision=revision, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise TeacherError(f"teacher {name_or_path!r}: cannot read its config and tokenizer: {first}") from e
    _check_tokenizer(tok, name_or_path)
    return config, tok


def _load_masked_lm(name_or_path: str, revision: str | None, trust_remote_code: bool, hub_kernels: bool):
    """The fp32 masked-LM model; refused when it has no trained MLM head or its weights cannot be read."""
    from safetensors import SafetensorError
    from transformers import AutoModelForMaskedLM

    try:
        model, info = AutoModelForMaskedLM.from_pretrained(
            name_or_path,
            revision=revision,
            trust_remote_code=trust_remote_code,
            attn_implementation="sdpa",
            dtype=torch.float32,
            output_loading_info=True,
            **hub_kernel_kwargs(hub_kernels),
        )
    except ValueError as e:
        raise TeacherError(f"{name_or_path!r} cannot be loaded as a masked-LM teacher: {e}") from e
    except (OSError, SafetensorError) as e:  # a missing, truncated or unreadable weight file
        raise TeacherError(f"teacher {name_or_path!r} cannot be loaded: {e}") from e
    missing = list(info.get("missing_keys", []))
    head_missing = [k for k in missing if not k.startswith(("bert.", "roberta.", "embeddings.", "encoder."))]
    if missing:
        raise TeacherError(
            f"{name_or_path!r} has no trained masked-LM head: {len(missing)} weights would be newly "
            f"initialised (e.g. {', '.join((head_missing or missing)[:3])}); use a *ForMaskedLM checkpoint"
        )
    return model.eval()


def _weights_fingerprint(model, name_or_path: str, revision: str | None) -> tuple[str, list[Path]]:
    """sha256 of the weight files (of the state dict where there are none to hash) and those files."""
    directory = _resolve_dir(name_or_path, revision)
    weight_files = []
    if directory is not None:
        for pat in WEIGHT_PATTERNS:
            weight_files.extend(directory.glob(pat))
    return (_sha256_files(weight_files) if weight_files else state_dict_sha256(model)), weight_files


def _head_of(model, wanted: bool) -> tuple[object | None, str | None]:
    """(the fp32 head's spec, why it cannot be extracted): (None, None) unless `wanted`."""
    if not wanted:
        return None, None
    try:
        return extract_head(model), None
    except TeacherError as e:
        return None, str(e)


def load_teacher(
    name_or_path: str,
    revision: str | None = None,
    device: str | torch.device | None = None,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    head: bool = False,
    hub_kernels: bool = False,
) -> Teacher:
    """Load a masked-LM teacher and its fast tokenizer; refuse a checkpoint without an MLM head.

    ``head``: also extract the MLM head (``Teacher.head``, from the fp32 weights before the model
    is cast to ``dtype``), or say why it cannot be (``Teacher.head_error``)."""
    from transformers import AutoTokenizer

    device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = pick_dtype(dtype, device)
    model = _load_masked_lm(name_or_path, revision, trust_remote_code, hub_kernels)
    tok = AutoTokenizer.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    _check_tokenizer(tok, name_or_path)
    wsha, weight_files = _weights_fingerprint(model, name_or_path, revision)
    head_spec, head_error = _head_of(model, head)
    model.to(device=device, dtype=torch_dtype)
    vocab_size = int(model.config.vocab_size)
    if len(tok) > vocab_size:
        raise TeacherError(f"tokenizer has {len(tok)} tokens but the model only {vocab_size} logits")
    local = Path(name_or_path).expanduser()
    return Teacher(
        model=model,
        tokenizer=tok,
        # A local teacher is recorded by absolute path, so a store is usable from any directory.
        name_or_path=str(local.resolve()) if local.is_dir() else str(name_or_path),
        revision=revision,
        weights_sha256=wsha,
        tokenizer_sha256=tokenizer_sha256(tok),
        vocab_size=vocab_size,
        device=device,
        dtype=torch_dtype,
        info={"weight_files": sorted(p.name for p in weight_files)},
        head=head_spec,
        head_error=head_error,
        hub_kernels=hub_kernels,
    )


@dataclass
class Signals:
    topk_ids: np.ndarray | None  # [B, L, K] int64 (None when top_k is 0)
    topk_logits: np.ndarray | None  # [B, L, K] float32
    lse: np.ndarray | None  # [B, L, nT] float32
    hidden: np.ndarray | None  # [B, L, H] in its stored form (offline_kd.store.hidden_dtype.encode)


@dataclass
class DeviceSignals:
    """The signals of one batch where the teacher ran; nothing has been copied to the host yet."""

    topk_ids: torch.Tensor | None  # [B, L, K] int64 (None when top_k is 0)
    topk_logits: torch.Tensor | None  # [B, L, K] float32
    lse: torch.Tensor | None  # [B, L, nT] float32
    hidden: torch.Tensor | None  # [B, L, H] in the stored dtype (offline_kd.store.hidden_dtype)
    nonfinite: torch.Tensor  # [B, L] bool: a NaN/inf logit at a real position


def _to_device(x: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x, dtype=np.int64) if not torch.is_tensor(x) else x, dtype=torch.long)
    if device.type == "cuda":  # from pinned memory the copy does not block the host
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


@torch.inference_mode()
def teacher_signals(
    model: torch.nn.Module,
    input_ids: np.ndarray | torch.Tensor,
    attention_mask: np.ndarray | torch.Tensor,
    top_k: int,
    temperatures: Sequence[float],
    hidden: bool,
    hidden_dtype: str = "float16",
    seq_offset: int = 0,
) -> DeviceSignals:
    """Run the teacher and extract its signals on its device, without a host synchronisation
    (except for float8 hidden states, whose range is checked at once).

    See :func:`compute_signals` for the values; ``nonfinite`` marks the positions to reject.
    """
    from offline_kd.store import hidden_dtype as hd

    device = next(model.parameters()).device
    ids, am = _to_device(input_ids, device), _to_device(attention_mask, device)
    out = model(input_ids=ids, attention_mask=am, output_hidden_states=hidden, return_dict=True)
    B, L, V = out.logits.shape
    real = am.bool()
    # A top_k 0 store keeps no top-k and no lse, but the logits are still checked for NaN/inf.
    sig = extract_signals(
        out.logits.reshape(B * L, V), real.reshape(-1), max(top_k, 1), temperatures or [1.0]
    )
    hid = None
    if hidden:
        h = out.hidden_states[-1].masked_fill(~real.unsqueeze(-1), 0.0)
        err = hd.range_error(h, hidden_dtype, seq_offset)
        if err:
            raise TeacherError(err)
        hid = h.to(hd.TORCH_DTYPES[hidden_dtype])
    keep = top_k > 0
    return DeviceSignals(
        topk_ids=sig.topk_ids.view(B, L, top_k) if keep else None,
        topk_logits=sig.topk_logits.view(B, L, top_k) if keep else None,
        lse=sig.lse.view(B, L, -1) if keep else None,
        hidden=hid,
        nonfinite=sig.nonfinite.view(B, L),
    )


def check_finite(nonfinite: np.ndarray | torch.Tensor, seq_offset: int = 0) -> None:
    """Raise :class:`TeacherFailed` naming the first sequence (``seq_offset`` + row) with a NaN/inf logit."""
    bad = np.asarray(nonfinite.cpu() if torch.is_tensor(nonfinite) else nonfinite)
    if bad.any():
        row = int(np.flatnonzero(bad.any(axis=1))[0])
        pos = int(np.flatnonzero(bad[row])[0])
        raise TeacherFailed(
            f"teacher produced NaN/inf logits for sequence {seq_offset + row} at position {pos}"
        )


def compute_signals(
    model: torch.nn.Module,
    input_ids: np.ndarray | torch.Tensor,
    attention_mask: np.ndarray | torch.Tensor,
    top_k: int,
    temperatures: Sequence[float],
    hidden: bool,
    seq_offset: int = 0,
    hidden_dtype: str = "float16",
) -> Signals:
    """Top-k raw logits (descending) and ids, full-vocab logsumexp(z/T) per T, last hidden state
    (encoded as ``hidden_dtype``; see :mod:`offline_kd.store.hidden_dtype`). ``top_k`` 0: no top-k, no lse.

    Values at padding positions (attention_mask == 0) are zero. A non-finite logit at a real
    position, or a hidden value beyond ``hidden_dtype``'s range, raises :class:`TeacherError`
    naming the sequence (``seq_offset`` + row). The extraction reads the logits in their own dtype with
    fp32 accumulation (`offline_kd.teacher.signals`).
    """
    from offline_kd.store import hidden_dtype as hd

    sig = teacher_signals(
        model, input_ids, attention_mask, top_k, temperatures, hidden, hidden_dtype, seq_offset
    )
    check_finite(sig.nonfinite, seq_offset)
    host = {k: getattr(sig, k) for k in ("topk_ids", "topk_logits", "lse")}
    return Signals(
        **{k: v.cpu().numpy() if v is not None else None for k, v in host.items()},
        hidden=hd.encode(sig.hidden, hidden_dtype) if sig.hidden is not None else None,
    )


# --------------------------------------------------------------------------- the head of a store


def head_from_teacher(
    path: str, expected_weights_sha256: str, *, revision: str | None = None, trust_remote_code: bool = False
) -> MLMHead:
    """The head of the teacher at ``path`` (fp32, CPU), for a store without a stored head; refused
    unless the teacher's weights hash is the store's."""
    t = load_teacher(
        path, revision=revision, device="cpu", dtype="float32", trust_remote_code=trust_remote_code
    )
    if t.weights_sha256 != expected_weights_sha256:
        raise TeacherError(
            f"--teacher {path!r} has weights sha256 {t.weights_sha256} but the store was made with "
            f"{expected_weights_sha256}"
        )
    return extract_head(t.model).module


def resolve_head(
    store,
    teacher: str | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> MLMHead:
    """The head of ``store`` (a :class:`~offline_kd.store.signal_store.SignalStore`): the stored one, else the
    one of ``teacher`` after checking its weights hash against the store's provenance."""
    if GROUP in store.group:
        return load_head(store, device=device, dtype=dtype)
    if teacher is None:
        head_group(store)  # raises the "no stored head, pass --teacher" error
    head = head_from_teacher(
        teacher,
        str(store.meta.teacher.get("weights_sha256")),
        revision=revision,
        trust_remote_code=trust_remote_code,
    )
    check_head_fits(head, store.meta.vocab_size, store.meta.hidden_size, repr(store.url))
    return head.to(device=device, dtype=dtype)
