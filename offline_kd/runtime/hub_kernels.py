"""Hugging Face hub kernels: off unless asked, so a model's layers are the ones its checkpoint defines.

transformers 5.25 and later turn hub kernels on in ``from_pretrained`` (``use_kernels=None`` means on
unless ``USE_HUB_KERNELS`` is off): layers may then be replaced by kernels downloaded from the hub. A
teacher must give the same signals on an air-gapped cluster as on a laptop, so every model offline_kd
loads asks for the checkpoint's own layers, and ``--hub-kernels`` opts in. A store records the
teacher's choice in its provenance (``teacher.hub_kernels``).
"""

from __future__ import annotations

import os

from offline_kd.runtime.errors import UsageError


def supported() -> bool:
    """This transformers knows hub kernels (``from_pretrained(use_kernels=...)``)."""
    from transformers import PreTrainedModel

    return hasattr(PreTrainedModel, "use_kernels")


def load_kwargs(enabled: bool = False) -> dict:
    """The ``from_pretrained`` keywords that make the hub-kernel choice explicit."""
    return {"use_kernels": bool(enabled)} if supported() else {}


def check(enabled: bool) -> None:
    """Refuse ``--hub-kernels`` where it cannot take effect, before any model loads."""
    if not enabled:
        return
    if not supported():
        raise UsageError("--hub-kernels: this transformers has no hub kernels (transformers >= 5 has them)")
    from transformers.utils.import_utils import is_env_variable_true, is_kernels_available

    if not is_kernels_available():
        raise UsageError("--hub-kernels: the 'kernels' package is not installed (pip install kernels)")
    if not is_env_variable_true("USE_HUB_KERNELS", default="YES"):  # transformers' own reading of it
        raise UsageError(f"--hub-kernels: USE_HUB_KERNELS={os.environ['USE_HUB_KERNELS']} disables them")
