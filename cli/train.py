"""Train a student from a signal store: the script the `deepspeed` / `torchrun` launchers run.

    deepspeed --num_gpus 8 cli/train.py --store STORE --student distil --output runs/s \\
        --deepspeed_config configs/ds_distilbert.json
    torchrun --nproc_per_node 2 cli/train.py ...
    python cli/train.py ...            # one process; a local process group is set up

A thin layer: parse the arguments into `offline_kd.train.TrainConfig` (its options are generated
from the dataclass's fields by `offline_kd.config`) and call `train`.
"""

from __future__ import annotations

import argparse
import logging
import sys


def build_parser() -> argparse.ArgumentParser:
    """Every option of `TrainConfig` (flags, defaults and help come from its fields)."""
    from offline_kd.config import add_arguments
    from offline_kd.settings import TrainConfig

    p = argparse.ArgumentParser(
        prog="cli/train.py",
        description="Offline distillation of a masked-LM student from a signal store (DeepSpeed).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_arguments(p, TrainConfig)
    return p


def parse_config(argv: list[str] | None = None):
    """The `TrainConfig` of a command line."""
    from offline_kd.config import from_namespace
    from offline_kd.settings import TrainConfig

    return from_namespace(TrainConfig, build_parser().parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from offline_kd.student import StudentError
    from offline_kd.train import NonFiniteLossError, train

    try:
        result = train(cfg)
    except (StudentError, NonFiniteLossError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        from offline_kd.store import StoreCorruptionError

        if isinstance(exc, StoreCorruptionError):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        raise
    import torch.distributed as dist

    if result.final_dir and (not dist.is_initialized() or dist.get_rank() == 0):
        logging.getLogger("offline_kd").info(
            "student written to %s after %d steps", result.final_dir, result.steps
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
