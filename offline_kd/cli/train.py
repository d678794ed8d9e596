"""Train a student from a signal store: the script the `deepspeed` / `torchrun` launchers run.

    deepspeed --num_gpus 8 --module offline_kd.cli.train --store STORE --student distil \\
        --output runs/s --deepspeed_config ds_distilbert
    deepspeed --num_gpus 8 cli/train.py ...          # the same from a checkout
    torchrun --nproc_per_node 2 -m offline_kd.cli.train ...
    srun --ntasks-per-node 8 python -m offline_kd.cli.train ...   # rank and world size from SLURM
    python -m offline_kd.cli.train ...               # one process; a local process group is set up

A thin layer: parse the arguments into `offline_kd.train.loop.TrainConfig` (its options are generated
from the dataclass's fields by `offline_kd.runtime.options`) and call `train`. A user error prints one
``Error: ...`` line (rank 0 only) and exits with status 2 (`offline_kd.runtime.errors`).
"""

from __future__ import annotations

import argparse
import logging
import sys


def build_parser() -> argparse.ArgumentParser:
    """Every option of `TrainConfig` (flags, defaults and help come from its fields)."""
    from offline_kd.runtime.options import add_arguments
    from offline_kd.runtime.settings import TrainConfig

    p = argparse.ArgumentParser(
        prog="offline_kd.cli.train",
        description="Offline distillation of a masked-LM student from a signal store (DeepSpeed).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_arguments(p, TrainConfig)
    return p


def parse_config(argv: list[str] | None = None):
    """The `TrainConfig` of a command line."""
    from offline_kd.runtime.options import from_namespace
    from offline_kd.runtime.settings import TrainConfig

    return from_namespace(TrainConfig, build_parser().parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from offline_kd.runtime.errors import exit_on_error
    from offline_kd.runtime.log_noise import drop_expected_deepspeed_warnings

    drop_expected_deepspeed_warnings(cpu_expected=False)

    with exit_on_error():
        from offline_kd.train.loop import train

        result = train(cfg)
    import torch.distributed as dist

    if result.final_dir and (not dist.is_initialized() or dist.get_rank() == 0):
        logging.getLogger("offline_kd").info(
            "student written to %s after %d steps", result.final_dir, result.steps
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
