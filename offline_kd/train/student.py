"""Build students for distillation from a signal store.

Three kinds of `--student` spec:

* ``distil`` / ``distil-<n>l``: the DistilBERT construction. For a BERT teacher the student is a
  ``DistilBertForMaskedLM`` (no token-type embeddings, no pooler) with half the teacher's layers
  (or ``n``), the teacher's width, heads, FFN size and activation, initialised from the teacher as
  the original ``extract_distilbert.py`` does: embeddings and LayerNorm, every other layer (or
  ``init_layers``) and the MLM head. DistilBERT has no token-type embeddings, so the teacher's
  ``token_type_embeddings[0]`` is folded into the position embeddings: for segment-0 input (all a
  packed store ever contains) the student's embedding output equals the teacher's. For other
  architectures the student is the teacher's own class with fewer layers, the layer weights
  remapped from the chosen teacher layers.
* a Hugging Face model directory or ``config.json``: any masked LM with the store's vocabulary.
  A directory with weights is loaded; a config is randomly initialised (optionally copying the
  teacher tensors whose names and shapes match with ``init_from_teacher``).
* a preset name from ``PRESETS`` (randomly initialised DistilBERT shapes, vocab from the store).

Every student is checked against the store before step 0: same vocabulary size, same tokenizer
fingerprint, and (when the cosine loss is on) the same hidden width unless a learned projection
is requested.

Built students have their token embeddings (and the tied output layer) padded to a multiple of
``VOCAB_MULTIPLE`` rows, so each row of the logits starts on a 16-byte boundary and the loss kernels
load and store 128-bit vectors. The padded ids are never inputs, and the loss takes the true vocabulary
size (`StudentBundle.vocab_size`): they get no probability and no gradient. The export trims the
padding off again, so the exported model has the tokenizer's vocabulary.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from offline_kd.runtime.errors import UsageError
from offline_kd.runtime.hub_kernels import load_kwargs as hub_kernel_kwargs

log = logging.getLogger(__name__)

# Rows of the students' embedding and output matrices are padded to a multiple of this (see above).
VOCAB_MULTIPLE = 64

# Randomly initialised DistilBERT-shaped presets; vocab size and positions come from the store.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(n_layers=2, dim=32, n_heads=2, hidden_dim=64),
    "tiny-narrow": dict(n_layers=2, dim=16, n_heads=2, hidden_dim=32),
    "mini": dict(n_layers=4, dim=256, n_heads=4, hidden_dim=1024),
    "small": dict(n_layers=4, dim=512, n_heads=8, hidden_dim=2048),
    "distilbert-base": dict(n_layers=6, dim=768, n_heads=12, hidden_dim=3072),
}

_DISTIL_RE = re.compile(r"^distil(?:-(\d+)l)?$")


class StudentError(UsageError):
    """The requested student cannot be trained from this store (raised before step 0)."""


@dataclass
class StudentBundle:
    model: nn.Module  # a transformers *ForMaskedLM
    tokenizer: Any
    hidden_size: int
    kind: str  # "distil", "distil-remap", "pretrained", "config", "preset"
    init_layers: list[int] | None = None
    teacher_path: str | None = None
    notes: list[str] = field(default_factory=list)
    vocab_size: int | None = None  # the vocabulary without the padding rows (None: not padded)

    @property
    def true_vocab_size(self) -> int:
        return self.vocab_size if self.vocab_size is not None else int(self.model.config.vocab_size)


def model_hidden_size(config) -> int:
    for name in ("hidden_size", "dim", "d_model"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    raise StudentError(f"cannot tell the hidden size of a {type(config).__name__}")


def parse_init_layers(value: str | list[int] | None) -> list[int] | None:
    if value is None or value == "":
        return None
    try:
        if isinstance(value, str):
            return [int(x) for x in value.split(",") if x.strip() != ""]
        return [int(x) for x in value]
    except ValueError:
        raise StudentError(
            f"--init-layers {value!r}: expected comma-separated teacher layer numbers, e.g. 0,2,4"
        ) from None


def default_init_layers(n_teacher: int, n_student: int) -> list[int]:
    """Every other teacher layer starting at 0; if that is too few, spread evenly (keeps the last)."""
    every_other = list(range(0, n_teacher, 2))
    if len(every_other) >= n_student:
        return every_other[:n_student]
    if n_student > n_teacher:
        raise StudentError(
            f"a {n_student}-layer student cannot be initialised from a {n_teacher}-layer teacher"
        )
    return sorted({round(i * (n_teacher - 1) / max(n_student - 1, 1)) for i in range(n_student)})


def _teacher_layers(config) -> int:
    for name in ("num_hidden_layers", "n_layers", "num_layers"):
        if isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    raise StudentError(f"cannot tell the layer count of a {type(config).__name__}")


def load_teacher(path: str, hub_kernels: bool = False):
    from safetensors import SafetensorError
    from transformers import AutoModelForMaskedLM

    try:
        model = AutoModelForMaskedLM.from_pretrained(
            path, dtype=torch.float32, **hub_kernel_kwargs(hub_kernels)
        )
    except (OSError, SafetensorError) as exc:  # missing, truncated or unreadable weights
        raise StudentError(
            f"cannot load the teacher from {path!r} (the store's recorded teacher; pass --teacher to "
            f"point at a local copy): {exc}"
        ) from exc
    model.eval()
    return model


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


# ---------------------------------------------------------------------------------------------
# DistilBERT from BERT


# BERT encoder-layer parameter -> DistilBERT's name for it
_BERT_TO_DISTILBERT_LAYER = {
    "attention.self.query": "attention.q_lin",
    "attention.self.key": "attention.k_lin",
    "attention.self.value": "attention.v_lin",
    "attention.output.dense": "attention.out_lin",
    "attention.output.LayerNorm": "sa_layer_norm",
    "intermediate.dense": "ffn.lin1",
    "output.dense": "ffn.lin2",
    "output.LayerNorm": "output_layer_norm",
}


def _distilbert_config(tc, n_layers: int):
    """The DistilBERT config of a BERT teacher's shape with `n_layers` layers."""
    from transformers import DistilBertConfig

    if getattr(tc, "position_embedding_type", "absolute") not in (None, "absolute"):
        raise StudentError("DistilBERT supports absolute position embeddings only")
    eps = getattr(tc, "layer_norm_eps", 1e-12)
    if abs(eps - 1e-12) > 1e-15:
        log.warning("teacher layer_norm_eps=%g; DistilBERT uses 1e-12", eps)
    return DistilBertConfig(
        vocab_size=tc.vocab_size,
        max_position_embeddings=tc.max_position_embeddings,
        sinusoidal_pos_embds=False,
        n_layers=n_layers,
        n_heads=tc.num_attention_heads,
        dim=tc.hidden_size,
        hidden_dim=tc.intermediate_size,
        dropout=tc.hidden_dropout_prob,
        attention_dropout=tc.attention_probs_dropout_prob,
        activation=tc.hidden_act,
        initializer_range=tc.initializer_range,
        pad_token_id=tc.pad_token_id,
        tie_word_embeddings=bool(getattr(tc, "tie_word_embeddings", True)),
    )


def _distilbert_state(t: dict[str, torch.Tensor], init_layers: list[int]) -> dict[str, torch.Tensor]:
    """DistilBERT tensors from a BertForMaskedLM state dict: embeddings, the `init_layers`, the MLM head."""
    sd: dict[str, torch.Tensor] = {}
    pre = "bert.embeddings."
    sd["distilbert.embeddings.word_embeddings.weight"] = t[pre + "word_embeddings.weight"]
    pos = t[pre + "position_embeddings.weight"]
    if pre + "token_type_embeddings.weight" in t:
        # Segment 0 folded in: word + (position + type0) == the teacher's word + position + type0.
        pos = pos + t[pre + "token_type_embeddings.weight"][0]
    sd["distilbert.embeddings.position_embeddings.weight"] = pos
    sd["distilbert.embeddings.LayerNorm.weight"] = t[pre + "LayerNorm.weight"]
    sd["distilbert.embeddings.LayerNorm.bias"] = t[pre + "LayerNorm.bias"]
    for s_idx, t_idx in enumerate(init_layers):
        for bert_name, db_name in _BERT_TO_DISTILBERT_LAYER.items():
            for p in ("weight", "bias"):
                sd[f"distilbert.transformer.layer.{s_idx}.{db_name}.{p}"] = t[
                    f"bert.encoder.layer.{t_idx}.{bert_name}.{p}"
                ]
    head = "cls.predictions."
    sd["vocab_transform.weight"] = t[head + "transform.dense.weight"]
    sd["vocab_transform.bias"] = t[head + "transform.dense.bias"]
    sd["vocab_layer_norm.weight"] = t[head + "transform.LayerNorm.weight"]
    sd["vocab_layer_norm.bias"] = t[head + "transform.LayerNorm.bias"]
    sd["vocab_projector.weight"] = t.get(head + "decoder.weight", t[pre + "word_embeddings.weight"])
    sd["vocab_projector.bias"] = t[head + "bias"] if head + "bias" in t else t[head + "decoder.bias"]
    return {k: v.detach().clone() for k, v in sd.items()}


def distilbert_from_bert(teacher, n_layers: int | None = None, init_layers: list[int] | None = None):
    """Return (DistilBertForMaskedLM, init_layers) initialised from a BertForMaskedLM teacher."""
    from transformers import DistilBertForMaskedLM

    n_teacher = teacher.config.num_hidden_layers
    if init_layers is None:
        n_layers = n_layers or max(n_teacher // 2, 1)
        init_layers = default_init_layers(n_teacher, n_layers)
    elif n_layers is not None and n_layers != len(init_layers):
        raise StudentError(f"--init-layers names {len(init_layers)} layers but the student has {n_layers}")
    if any(i < 0 or i >= n_teacher for i in init_layers):
        raise StudentError(f"--init-layers {init_layers} out of range for a {n_teacher}-layer teacher")
    config = _distilbert_config(teacher.config, len(init_layers))
    student = DistilBertForMaskedLM(config)
    missing, unexpected = student.load_state_dict(
        _distilbert_state(teacher.state_dict(), init_layers), strict=False
    )
    tied = config.tie_word_embeddings
    missing = [m for m in missing if not (tied and m == "vocab_projector.weight")]
    if missing or unexpected:
        raise StudentError(f"DistilBERT mapping incomplete: missing={missing} unexpected={unexpected}")
    if tied:
        student.tie_weights()
    return student, list(init_layers)


def remap_fewer_layers(teacher, n_layers: int | None = None, init_layers: list[int] | None = None):
    """Same class as the teacher with fewer layers; layer i of the student = teacher layer init_layers[i]."""
    import copy

    tc = teacher.config
    n_teacher = _teacher_layers(tc)
    if init_layers is None:
        init_layers = default_init_layers(n_teacher, n_layers or max(n_teacher // 2, 1))
    config = copy.deepcopy(tc)
    config.num_hidden_layers = len(init_layers)
    student = type(teacher)(config)
    pattern = re.compile(r"^(.*?\.layers?\.)(\d+)\.(.*)$")
    t = teacher.state_dict()
    reverse = {t_idx: s_idx for s_idx, t_idx in enumerate(init_layers)}
    sd = {}
    for k, v in t.items():
        m = pattern.match(k)
        if m is None:
            sd[k] = v.detach().clone()
        elif int(m.group(2)) in reverse:
            sd[f"{m.group(1)}{reverse[int(m.group(2))]}.{m.group(3)}"] = v.detach().clone()
    missing, unexpected = student.load_state_dict(sd, strict=False)
    if unexpected or [m for m in missing if "layer" in m]:
        raise StudentError(f"layer remap incomplete: missing={missing} unexpected={unexpected}")
    if getattr(config, "tie_word_embeddings", False):
        student.tie_weights()
    return student, list(init_layers)


# ---------------------------------------------------------------------------------------------


def copy_matching(student: nn.Module, teacher: nn.Module) -> int:
    """Copy teacher tensors whose names and shapes match the student's; return how many."""
    s = student.state_dict()
    t = teacher.state_dict()
    sd = {k: t[k].detach().clone() for k in s if k in t and t[k].shape == s[k].shape}
    student.load_state_dict(sd, strict=False)
    return len(sd)


def _is_hf_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").exists()


def _has_weights(path: Path) -> bool:
    return any(path.glob("*.safetensors")) or (path / "pytorch_model.bin").exists()


def pad_vocabulary(model: nn.Module, multiple: int = VOCAB_MULTIPLE) -> int:
    """Pad the model's token embeddings and output layer to a multiple of `multiple` rows; return the
    vocabulary size before padding. The new rows are initialised but never used: no input id reaches
    them and the loss gives them no probability."""
    vocab = int(model.config.vocab_size)
    if multiple > 1 and vocab % multiple:
        model.resize_token_embeddings(vocab, pad_to_multiple_of=multiple, mean_resizing=False)
    return vocab


def build_student(spec: str, **kwargs) -> StudentBundle:
    """Build the student named by `spec` (see module docstring and `_build_student`), its vocabulary
    padded to a multiple of VOCAB_MULTIPLE."""
    bundle = _build_student(spec, **kwargs)
    bundle.vocab_size = pad_vocabulary(bundle.model)
    return bundle


def _build_student(
    spec: str,
    *,
    teacher_path: str | None,
    vocab_size: int,
    max_positions: int,
    pad_token_id: int = 0,
    init_layers: str | list[int] | None = None,
    init_from_teacher: bool = False,
    seed: int = 0,
    hub_kernels: bool = False,
) -> StudentBundle:
    """Build the student named by `spec` (see module docstring). `teacher_path` loads the teacher
    and its tokenizer where the spec needs them; `hub_kernels` lets transformers swap in hub kernels."""
    torch.manual_seed(seed)
    layers = parse_init_layers(init_layers)
    m = _DISTIL_RE.match(spec)
    if m is not None:
        n = int(m.group(1)) if m.group(1) else None
        return _distil_student(teacher_path, n, layers, hub_kernels)
    if spec in PRESETS:
        if teacher_path is None:
            raise StudentError("preset students take the teacher's tokenizer: pass --teacher")
        bundle = _preset_student(spec, teacher_path, vocab_size, max_positions, pad_token_id)
    elif _is_hf_dir(Path(spec)) or (Path(spec).is_file() and Path(spec).suffix == ".json"):
        bundle = _hf_student(spec, teacher_path, hub_kernels)
    else:
        raise StudentError(
            f"unknown student {spec!r}: use 'distil', 'distil-<n>l', a preset ({', '.join(PRESETS)}), "
            "or a Hugging Face model directory / config.json"
        )
    if init_from_teacher:
        if teacher_path is None:
            raise StudentError("--init-from-teacher needs the teacher: pass --teacher")
        copied = copy_matching(bundle.model, load_teacher(teacher_path, hub_kernels))
        bundle.notes.append(f"copied {copied} tensors from teacher")
    return bundle


def _distil_student(
    teacher_path: str | None, n_layers: int | None, init_layers: list[int] | None, hub_kernels: bool
) -> StudentBundle:
    """``distil[-<n>l]``: the teacher with fewer layers (DistilBERT for a BERT teacher), from its layers."""
    if teacher_path is None:
        raise StudentError("the distil student needs the teacher: pass --teacher")
    teacher = load_teacher(teacher_path, hub_kernels)
    if teacher.config.model_type == "bert":
        model, layers = distilbert_from_bert(teacher, n_layers, init_layers)
        kind = "distil"
    else:
        model, layers = remap_fewer_layers(teacher, n_layers, init_layers)
        kind = "distil-remap"
    del teacher
    return StudentBundle(
        model, load_tokenizer(teacher_path), model_hidden_size(model.config), kind, layers, teacher_path
    )


def _preset_student(
    spec: str, teacher_path: str, vocab_size: int, max_positions: int, pad_token_id: int
) -> StudentBundle:
    """A randomly initialised DistilBERT of a preset's shape, with the teacher's tokenizer."""
    from transformers import DistilBertConfig, DistilBertForMaskedLM

    cfg = DistilBertConfig(
        vocab_size=vocab_size,
        max_position_embeddings=max_positions,
        pad_token_id=pad_token_id,
        **PRESETS[spec],
    )
    model = DistilBertForMaskedLM(cfg)
    return StudentBundle(model, load_tokenizer(teacher_path), cfg.dim, "preset", None, teacher_path)


def _hf_student(spec: str, teacher_path: str | None, hub_kernels: bool) -> StudentBundle:
    """A Hugging Face model directory (pretrained when it has weights) or config.json."""
    from transformers import AutoConfig, AutoModelForMaskedLM

    path = Path(spec)
    tok_src = str(path) if path.is_dir() and (path / "tokenizer_config.json").exists() else teacher_path
    if tok_src is None:
        raise StudentError(f"{spec} has no tokenizer: pass --teacher")
    if path.is_dir() and _has_weights(path):
        model = AutoModelForMaskedLM.from_pretrained(
            str(path), dtype=torch.float32, **hub_kernel_kwargs(hub_kernels)
        )
        kind = "pretrained"
    else:
        if path.is_file():
            cfg_dict = json.loads(path.read_text())
            cfg = AutoConfig.for_model(cfg_dict.pop("model_type"), **cfg_dict)
        else:
            cfg = AutoConfig.from_pretrained(str(path))
        model = AutoModelForMaskedLM.from_config(cfg)
        kind = "config"
    return StudentBundle(
        model, load_tokenizer(tok_src), model_hidden_size(model.config), kind, None, teacher_path
    )


def _spec_path_problem(path: Path) -> str | None:
    """Why a student directory or config file cannot be built from, or None when it can."""
    if path.is_dir():
        return None if _is_hf_dir(path) else "not a Hugging Face model directory (no config.json)"
    if path.suffix != ".json":
        return "a file that is not a config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return f"not a readable JSON config ({e})"
    if not isinstance(config, dict) or "model_type" not in config:
        return 'a JSON config without "model_type" (e.g. "distilbert")'
    return None


def _check_student_is_a_masked_lm(path: Path, spec: str) -> None:
    """A student directory or config.json must describe a masked LM (not a GPT-2, say)."""
    from transformers import AutoConfig

    from offline_kd.runtime.checks import check_masked_lm

    if path.is_dir():
        config = AutoConfig.from_pretrained(str(path))
    else:
        fields = json.loads(path.read_text(encoding="utf-8"))
        config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    check_masked_lm(config, f"--student {spec}")


def student_needs_teacher(spec: str, init_from_teacher: bool) -> bool:
    """Whether building `spec` reads the teacher (its weights, or only its tokenizer)."""
    path = Path(spec)
    if _DISTIL_RE.match(spec) or spec in PRESETS or init_from_teacher:
        return True
    has_tokenizer = path.is_dir() and (path / "tokenizer_config.json").exists()
    return path.exists() and not has_tokenizer


def check_spec(spec: str, *, init_layers: str | list[int] | None = None, teacher_config=None) -> None:
    """Refuse a `--student` spec (and `--init-layers`) that cannot be built, before anything loads.

    `teacher_config` (the teacher's transformers config, when the student needs the teacher)
    bounds the distil student's layer count and ``--init-layers``."""
    layers = parse_init_layers(init_layers)
    m = _DISTIL_RE.match(spec)
    if m is None:
        if layers is not None:
            raise StudentError(f"--init-layers applies to the distil students only, not to --student {spec}")
        path = Path(spec)
        if spec in PRESETS:
            return
        if not path.exists():
            raise StudentError(
                f"--student {spec}: unknown; use 'distil', 'distil-<n>l', a preset ({', '.join(PRESETS)}), "
                "or a Hugging Face model directory / config.json"
            )
        problem = _spec_path_problem(path)
        if problem is not None:
            raise StudentError(f"--student {spec}: {problem}")
        _check_student_is_a_masked_lm(path, spec)
        return
    if teacher_config is None:
        return
    n_teacher = _teacher_layers(teacher_config)
    n = int(m.group(1)) if m.group(1) else None
    if n is not None and not 1 <= n <= n_teacher:
        raise StudentError(f"--student {spec}: a {n}-layer student from a {n_teacher}-layer teacher")
    if layers is not None:
        if n is not None and n != len(layers):
            raise StudentError(f"--init-layers names {len(layers)} layers but --student {spec} has {n}")
        if any(i < 0 or i >= n_teacher for i in layers):
            raise StudentError(f"--init-layers {layers} out of range for a {n_teacher}-layer teacher")


def check_compatible(
    bundle: StudentBundle,
    *,
    store_vocab_size: int,
    store_tokenizer_sha256: str | None,
    teacher_hidden_size: int,
    need_hidden: bool,
    hidden_projection: bool,
) -> None:
    """Refuse, before step 0, a student that cannot learn from this store."""
    from offline_kd.teacher.model import tokenizer_sha256

    vocab = bundle.true_vocab_size
    if vocab != store_vocab_size:
        raise StudentError(
            f"vocabulary mismatch: the student has {vocab} output classes but the store's teacher has "
            f"{store_vocab_size}"
        )
    if store_tokenizer_sha256:
        sha = tokenizer_sha256(bundle.tokenizer)
        if sha != store_tokenizer_sha256:
            raise StudentError(
                f"tokenizer mismatch: the student's tokenizer sha256 {sha} differs from the store's "
                f"{store_tokenizer_sha256}"
            )
    if need_hidden and bundle.hidden_size != teacher_hidden_size and not hidden_projection:
        raise StudentError(
            f"hidden width mismatch: student {bundle.hidden_size} vs teacher {teacher_hidden_size}; the "
            "cosine loss needs equal widths. Pass --hidden-projection to learn a projection "
            "student→teacher, or --alpha-cos 0"
        )
