"""The teacher's MLM head: extracted from a masked-LM teacher, stored beside the signals, rebuilt.

A ``*ForMaskedLM`` teacher turns its last hidden state into logits with a small head: a dense
transform, an activation, a LayerNorm, and the decoder with its bias. Kept in the store, that head
turns the stored hidden states back into the teacher's full-vocabulary logits at training time
("exact" KL source). The head is rebuilt as :class:`MLMHead` from plain arrays and a config: no
pickle, no remote code. See docs/store-format.md (``teacher_head/``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from offline_kd.store.signal_store import HEAD_GROUP, SignalStore, StoreCorruptionError, StoreError
from offline_kd.teacher.errors import TeacherError, TeacherFailed

GROUP = HEAD_GROUP
ATTR_KEY = "offline_kd_head"
HEAD_FORMAT_VERSION = 1
ROLES = (
    "dense.weight",
    "dense.bias",
    "layer_norm.weight",
    "layer_norm.bias",
    "decoder.weight",
    "decoder.bias",
)
COMPUTATION = "logits = decoder(layer_norm(activation(dense(hidden))))"
# extract_head's probe: the rebuilt head on the teacher's last hidden state must give the teacher's
# own fp32 logits to within this fraction of the largest logit (the same ops: ~1e-7 in practice).
PROBE_RTOL = 1e-4
PROBE_TOKENS = 16


class MLMHead(nn.Module):
    """``logits = decoder(layer_norm(act(dense(hidden))))``: hidden ``[..., H]`` → logits ``[..., V]``."""

    def __init__(
        self, hidden_size: int, transform_size: int, vocab_size: int, activation: str, layer_norm_eps: float
    ):
        super().__init__()
        from transformers.activations import ACT2FN

        if activation not in ACT2FN:
            raise TeacherError(f"unknown head activation {activation!r} (known: {sorted(ACT2FN)})")
        self.activation_name = activation
        self.dense = nn.Linear(hidden_size, transform_size)
        self.act = ACT2FN[activation]
        self.layer_norm = nn.LayerNorm(transform_size, eps=layer_norm_eps)
        self.decoder = nn.Linear(transform_size, vocab_size)

    @property
    def hidden_size(self) -> int:
        return self.dense.in_features

    @property
    def vocab_size(self) -> int:
        return self.decoder.out_features

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.layer_norm(self.act(self.dense(hidden))))


@dataclass
class HeadSpec:
    """An extracted head: the module, the teacher's state-dict key of each of its parameters, the
    teacher's head class and the config that rebuilds it."""

    module: MLMHead
    keys: dict[str, str]  # role ("dense.weight", ...) -> the teacher's state-dict key
    class_name: str
    config: dict

    @property
    def vocab_size(self) -> int:
        return self.module.vocab_size

    @property
    def hidden_size(self) -> int:
        return self.module.hidden_size

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The head's parameters in fp32 under the teacher's state-dict keys."""
        own = self.module.state_dict()
        return {self.keys[role]: own[role].detach().float().cpu() for role in ROLES}


# --------------------------------------------------------------------------- extraction
@dataclass(frozen=True)
class _Layout:
    """Where a family of teachers keeps its head's modules (paths in the model)."""

    family: str
    head: str  # the head module ("" when its layers sit on the model itself)
    dense: str
    layer_norm: str
    decoder: str
    activation: str  # a config attribute naming the activation, or "=name" for a fixed one


LAYOUTS = (
    _Layout("bert", "cls", "cls.predictions.transform.dense", "cls.predictions.transform.LayerNorm",
            "cls.predictions.decoder", "hidden_act"),
    _Layout("roberta", "lm_head", "lm_head.dense", "lm_head.layer_norm", "lm_head.decoder", "=gelu"),
    _Layout("distilbert", "", "vocab_transform", "vocab_layer_norm", "vocab_projector", "activation"),
)  # fmt: skip
_DISTILBERT_CHILDREN = {
    "distilbert",
    "vocab_transform",
    "activation",
    "vocab_layer_norm",
    "vocab_projector",
    "mlm_loss_fct",
}


def _submodule(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _find_layout(model: nn.Module) -> _Layout:
    name = type(model).__name__
    for lay in LAYOUTS:
        mods = [_submodule(model, p) for p in (lay.dense, lay.layer_norm, lay.decoder)]
        if (
            isinstance(mods[0], nn.Linear)
            and isinstance(mods[1], nn.LayerNorm)
            and isinstance(mods[2], nn.Linear)
            and mods[0].bias is not None
            and mods[2].bias is not None
        ):
            return lay
    raise TeacherError(
        f"{name}: its MLM head is not a recognised function of the last hidden state alone (BERT "
        "cls.predictions, RoBERTa lm_head, DistilBERT vocab_* layers); it cannot be stored for exact KL"
    )


def _check_complete(model: nn.Module, lay: _Layout, used: list[nn.Parameter]) -> None:
    """Refuse a head with parameters beyond the transform and the decoder (its logits would not be
    ``decoder(layer_norm(act(dense(h))))``)."""
    name = type(model).__name__
    if lay.head:
        ids = {id(p) for p in used}
        extra = [n for n, p in model.get_submodule(lay.head).named_parameters() if id(p) not in ids]
    else:
        extra = [c for c, _ in model.named_children() if c not in _DISTILBERT_CHILDREN]
    if extra:
        raise TeacherError(
            f"{name}: its MLM head has inputs beyond the last hidden state's transform and decoder "
            f"({', '.join(extra[:3])}); it cannot be stored for exact KL"
        )


def _activation_name(model: nn.Module, lay: _Layout) -> str:
    if lay.activation.startswith("="):
        return lay.activation[1:]
    act = getattr(model.config, lay.activation, None)
    if not isinstance(act, str):
        raise TeacherError(
            f"{type(model).__name__}: the head's activation ({lay.activation}={act!r}) is not a named "
            "activation; the head cannot be rebuilt from the store"
        )
    return act


def extract_head(model: nn.Module) -> HeadSpec:
    """The MLM head of a loaded ``*ForMaskedLM`` teacher as an fp32 :class:`MLMHead` (a copy).

    Raises :class:`TeacherError` for a head that is not ``decoder(LN(act(dense(last hidden))))`` or
    whose rebuilt copy does not reproduce the teacher's own logits on a probe input.
    """
    lay = _find_layout(model)
    dense, ln, dec = (model.get_submodule(p) for p in (lay.dense, lay.layer_norm, lay.decoder))
    _check_complete(model, lay, [dense.weight, dense.bias, ln.weight, ln.bias, dec.weight, dec.bias])
    config = {
        "family": lay.family,
        "architecture": type(model).__name__,
        "model_type": getattr(model.config, "model_type", None),
        "hidden_size": int(dense.in_features),
        "transform_size": int(dense.out_features),
        "vocab_size": int(dec.out_features),
        "activation": _activation_name(model, lay),
        "layer_norm_eps": float(ln.eps),
        "computation": COMPUTATION,
    }
    head = build_head(config)
    paths = {"dense": lay.dense, "layer_norm": lay.layer_norm, "decoder": lay.decoder}
    keys = {role: f"{paths[role.split('.')[0]]}.{role.split('.')[1]}" for role in ROLES}
    with torch.no_grad():
        for role, mod in (("dense", dense), ("layer_norm", ln), ("decoder", dec)):
            getattr(head, role).weight.copy_(mod.weight.float())
            getattr(head, role).bias.copy_(mod.bias.float())
    class_name = type(model.get_submodule(lay.head)).__name__ if lay.head else type(model).__name__
    spec = HeadSpec(module=head, keys=keys, class_name=class_name, config=config)
    _probe(model, spec)
    return spec


def build_head(config: dict) -> MLMHead:
    """An :class:`MLMHead` shaped by ``config`` (uninitialised weights), fp32, eval, no gradients."""
    head = MLMHead(
        int(config["hidden_size"]),
        int(config.get("transform_size", config["hidden_size"])),
        int(config["vocab_size"]),
        str(config["activation"]),
        float(config["layer_norm_eps"]),
    )
    head.eval().requires_grad_(False)
    return head


@torch.no_grad()
def _probe(model: nn.Module, spec: HeadSpec) -> None:
    """The rebuilt head on the teacher's last hidden state gives the teacher's logits (fp32, CPU)."""
    max_pos = int(getattr(model.config, "max_position_embeddings", PROBE_TOKENS + 2) or PROBE_TOKENS + 2)
    n = max(2, min(PROBE_TOKENS, max_pos - 2))
    gen = torch.Generator().manual_seed(0)
    device = next(model.parameters()).device
    ids = torch.randint(0, spec.vocab_size, (2, n), generator=gen).to(device)
    out = model(
        input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True, return_dict=True
    )
    want = out.logits.float().cpu()
    got = spec.module(out.hidden_states[-1].float().cpu())
    if got.shape != want.shape:
        raise TeacherError(
            f"{type(model).__name__}: the head gives logits of shape {tuple(got.shape)}, the teacher "
            f"{tuple(want.shape)}; it cannot be stored for exact KL"
        )
    both = torch.isfinite(got) & torch.isfinite(want)  # a NaN teacher is precompute's error, not the head's
    same_nonfinite = bool((torch.isfinite(got) == torch.isfinite(want)).all())
    diff = float((got - want)[both].abs().max()) if bool(both.any()) else 0.0
    if not same_nonfinite:
        diff = float("nan")
    if not diff <= PROBE_RTOL * max(1.0, float(want.abs().max())):
        raise TeacherError(
            f"{type(model).__name__}: its MLM head applied to the last hidden state does not reproduce "
            f"the teacher's logits (max abs difference {diff:.3g}); it cannot be stored for exact KL"
        )


# --------------------------------------------------------------------------- storage
def save_head(group, spec: HeadSpec, compression_level: int = 1) -> None:
    """Write the head as fp32 arrays in ``group/teacher_head/``, named by the teacher's state-dict
    keys, each chunk zstd-compressed and crc32c-checked; class and config in the group attributes."""
    import zarr.codecs as zc

    hg = group.require_group(GROUP)
    for key, tensor in spec.state_dict().items():
        a = tensor.numpy()
        # ~4 MiB chunks of whole rows (the decoder is V x H: 12 MiB a chunk would make 8 chunks at bert-base)
        rows = max(1, min(a.shape[0], (4 << 20) // a[0].nbytes)) if a.ndim > 1 else a.shape[0]
        chunks = (rows,) + a.shape[1:]
        arr = hg.create_array(
            key, shape=a.shape, dtype="float32", chunks=chunks, serializer=zc.BytesCodec(),
            compressors=[zc.ZstdCodec(level=compression_level), zc.Crc32cCodec()], fill_value=0.0,
            overwrite=True, config={"write_empty_chunks": True},
        )  # fmt: skip
        arr[...] = a
    hg.attrs[ATTR_KEY] = {
        "format_version": HEAD_FORMAT_VERSION,
        "class": spec.class_name,
        "config": spec.config,
        "parameters": dict(spec.keys),
        # A chunk file that went missing reads back as zeros: the hashes catch what crc32c cannot.
        "sha256": {key: _sha256(t.numpy()) for key, t in spec.state_dict().items()},
    }


def _sha256(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a, dtype="<f4").tobytes()).hexdigest()


def head_group(obj):
    """(the ``teacher_head`` zarr group, the store meta or None, a name for messages)."""
    if isinstance(obj, str):
        obj = SignalStore.open(obj)
    if isinstance(obj, SignalStore):
        if GROUP not in obj.group:
            raise StoreError(
                f"{obj.url!r} has no stored teacher head (made before format version 2, with --no-store-head "
                "or without hidden states); pass --teacher with the teacher it was made with"
            )
        return obj.group[GROUP], obj.meta, obj.url
    if ATTR_KEY in obj.attrs:
        return obj, None, str(obj.path or GROUP)
    if GROUP in obj:
        return obj[GROUP], None, GROUP
    raise StoreError(f"zarr group {obj.path!r} holds no teacher head")


def load_head(
    store_or_group, device: str | torch.device | None = None, dtype: torch.dtype = torch.float32
) -> MLMHead:
    """Rebuild the stored head (a store URL, a :class:`~offline_kd.store.signal_store.SignalStore`, its root zarr
    group or its ``teacher_head`` group) from its arrays. Checked against the store's vocabulary and
    hidden sizes when the store is known; no gradients, eval mode."""
    hg, meta, where = head_group(store_or_group)
    info = hg.attrs.asdict().get(ATTR_KEY)
    if not info or info.get("format_version") != HEAD_FORMAT_VERSION:
        raise StoreError(f"{where}: unsupported teacher head format {info and info.get('format_version')!r}")
    head = build_head(info["config"])
    state = {}
    for role, key in info["parameters"].items():
        try:
            state[role] = torch.from_numpy(np.ascontiguousarray(hg[key][...]))
        except KeyError as e:
            raise StoreError(f"{where}: teacher head array {key!r} is missing") from e
        except Exception as e:  # noqa: BLE001 - checksum/decoding errors surface as various types
            raise StoreCorruptionError(f"{where}: teacher head array {key!r} is corrupt: {e}") from e
        if _sha256(state[role].numpy()) != info["sha256"].get(key):
            raise StoreCorruptionError(f"{where}: teacher head array {key!r} does not match its sha256")
    head.load_state_dict(state)
    if meta is not None:
        check_head_fits(head, meta.vocab_size, meta.hidden_size, where)
    return head.to(device=device, dtype=dtype)


def check_head_fits(head: MLMHead, vocab_size: int, hidden_size: int, where: str) -> None:
    """One-line :class:`TeacherError` when the head's vocabulary or hidden size is not the store's."""
    if head.vocab_size != int(vocab_size):
        raise TeacherError(
            f"the teacher head has a vocabulary of {head.vocab_size:,} but {where} has {int(vocab_size):,}"
        )
    if head.hidden_size != int(hidden_size):
        raise TeacherError(
            f"the teacher head takes hidden size {head.hidden_size} but {where} stores {int(hidden_size)}"
        )


# --------------------------------------------------------------------------- reproduction check
# Precompute refuses a head whose logits, from the hidden states as stored, are further from the
# teacher's own than this (first batch, real positions; docs/store-format.md, "teacher_head").
# Good stores measure 1e-8 (fp32 teacher, float16 hidden) to 3e-4 (bf16 teacher, float8 hidden); a
# head that is not the teacher's is off by nats. Top-1 agreement is recorded, not gated: near-ties
# flip it without moving the distribution.
CHECK_MAX_KL = 0.05  # mean KL(teacher || recovered) at T = 1, nats
CHECK_POSITIONS = 4096  # real positions of the first batch compared (bounds the check's cost)
CHECK_TOPK = 64  # k of the top-k agreement when the store keeps no top-k


def compare_logits(reference: torch.Tensor, recovered: torch.Tensor, k: int, chunk: int = 512) -> dict:
    """How far ``recovered [N, V]`` logits are from ``reference [N, V]``: ``max_abs_logit_diff``,
    ``top1_agreement``, ``topk_agreement`` (mean overlap of the two top-``k`` sets / k),
    ``kl_t1_mean`` / ``kl_t1_max`` (KL(reference ‖ recovered) at T = 1), ``positions``, ``k``."""
    n = reference.shape[0]
    k = min(k, reference.shape[-1])
    maxdiff, top1, topk, kl_sum, kl_max = 0.0, 0, 0.0, 0.0, 0.0
    for a in range(0, n, chunk):
        ref = reference[a : a + chunk].float()
        rec = recovered[a : a + chunk].float().to(ref.device)
        maxdiff = max(maxdiff, float((ref - rec).abs().max()))
        top1 += int((ref.argmax(-1) == rec.argmax(-1)).sum())
        ri, ci = ref.topk(k, dim=-1).indices, rec.topk(k, dim=-1).indices
        topk += float((ri.unsqueeze(-1) == ci.unsqueeze(-2)).any(-1).float().sum()) / k
        lp, lq = ref.log_softmax(-1), rec.log_softmax(-1)
        kl = (lp.exp() * (lp - lq)).sum(-1)
        kl_sum, kl_max = kl_sum + float(kl.sum()), max(kl_max, float(kl.max()))
    return {
        "positions": int(n),
        "k": int(k),
        "max_abs_logit_diff": maxdiff,
        "top1_agreement": top1 / max(n, 1),
        "topk_agreement": topk / max(n, 1),
        "kl_t1_mean": kl_sum / max(n, 1),
        "kl_t1_max": kl_max,
    }


@torch.no_grad()
def reproduction_check(
    model: nn.Module,
    head: MLMHead,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    hidden_dtype: str,
    k: int,
) -> dict:
    """The teacher's own logits on a batch against its head (fp32) applied to the batch's last
    hidden state rounded to ``hidden_dtype``, over at most :data:`CHECK_POSITIONS` real positions.
    Raises :class:`TeacherError` beyond :data:`CHECK_MAX_KL`."""
    from offline_kd.store.hidden_dtype import as_stored, range_error

    device = next(model.parameters()).device
    ids, am = (
        input_ids.to(device=device, dtype=torch.long),
        attention_mask.to(device=device, dtype=torch.long),
    )
    out = model(input_ids=ids, attention_mask=am, output_hidden_states=True, return_dict=True)
    real = am.bool()
    finite = torch.isfinite(out.logits).all(dim=-1) | ~real
    if not bool(finite.all()):
        row = int((~finite).any(dim=1).nonzero()[0, 0])
        pos = int((~finite[row]).nonzero()[0, 0])
        raise TeacherFailed(f"teacher produced NaN/inf logits for sequence {row} at position {pos}")
    err = range_error(out.hidden_states[-1].float().masked_fill(~real[..., None], 0.0), hidden_dtype)
    if err:
        raise TeacherError(err)
    want = out.logits[real][:CHECK_POSITIONS]
    hidden = as_stored(out.hidden_states[-1][real][:CHECK_POSITIONS].float(), hidden_dtype)
    head = head.to(device)
    got = torch.cat([head(hidden[a : a + 512]) for a in range(0, hidden.shape[0], 512)])
    figures = compare_logits(want, got, k)
    figures.update(teacher_dtype=str(next(model.parameters()).dtype).replace("torch.", ""))
    figures.update(hidden_dtype=hidden_dtype, tolerance={"kl_t1_mean": CHECK_MAX_KL})
    if not figures["kl_t1_mean"] <= CHECK_MAX_KL:
        raise TeacherError(
            f"{type(model).__name__}: its head on the {hidden_dtype} hidden states does not reproduce the "
            f"teacher's logits (first batch: mean KL {figures['kl_t1_mean']:.3g} > {CHECK_MAX_KL}, top-1 "
            f"agreement {figures['top1_agreement']:.3f}); precompute with --no-store-head"
        )
    return figures
