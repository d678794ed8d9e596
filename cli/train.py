"""Train a student from a signal store: the script the `deepspeed` / `torchrun` launchers run.

    deepspeed --num_gpus 8 cli/train.py --store STORE --student distil --output runs/s \\
        --deepspeed_config configs/ds_distilbert.json
    torchrun --nproc_per_node 2 cli/train.py ...
    python cli/train.py ...            # one process; a local process group is set up

A thin layer: parse the arguments into `offline_kd.train.TrainConfig` and call `train`.
"""

from __future__ import annotations

import argparse
import logging
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cli/train.py",
        description="Offline distillation of a masked-LM student from a signal store (DeepSpeed).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("inputs and outputs")
    g.add_argument("--store", required=True, help="signal store URL (local path or fsspec URL)")
    g.add_argument(
        "--student",
        required=True,
        help="'distil', 'distil-<n>l', a preset (tiny, tiny-narrow, mini, small, distilbert-base) or a HF model "
        "directory / config.json",
    )
    g.add_argument("--output", required=True, help="run directory (checkpoints, logs, final/)")
    g.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config", default=None)
    g.add_argument("--teacher", default=None, help="teacher path (default: the one recorded in the store)")
    g.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE")

    g = p.add_argument_group("student")
    g.add_argument("--init-layers", default=None, help="teacher layers to copy, e.g. 0,2,4,7,9,11")
    g.add_argument("--init-from-teacher", action="store_true", help="copy teacher tensors whose shapes match")
    g.add_argument(
        "--hidden-projection", action="store_true", help="learn a student→teacher width projection"
    )

    g = p.add_argument_group("loss")
    g.add_argument("--alpha-ce", type=float, default=5.0, help="weight of the distillation KL")
    g.add_argument("--alpha-mlm", type=float, default=2.0, help="weight of the MLM cross-entropy")
    g.add_argument("--alpha-cos", type=float, default=1.0, help="weight of the hidden-state cosine loss")
    g.add_argument("--temperature", type=float, default=2.0)
    g.add_argument("--kl-tail", action=argparse.BooleanOptionalAction, default=True, help="tail-aware KL")
    g.add_argument("--restrict-kl-to-mask", action="store_true", help="KL and cosine over masked tokens only")

    g = p.add_argument_group("schedule")
    g.add_argument("--epochs", type=int, default=3)
    g.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    g.add_argument(
        "--schedule-steps", type=int, default=None, help="LR schedule length for 'auto' total steps"
    )
    g.add_argument("--micro-batch-size", type=int, default=None)
    g.add_argument("--gradient-accumulation-steps", type=int, default=None)
    g.add_argument("--lr", type=float, default=None)
    g.add_argument("--warmup-fraction", type=float, default=0.05)
    g.add_argument("--seed", type=int, default=0)

    g = p.add_argument_group("data")
    g.add_argument("--num-workers", type=int, default=0, help="DataLoader reader processes")
    g.add_argument("--buffer-chunks", type=int, default=4, help="store chunks per shuffle buffer")

    g = p.add_argument_group("checkpoints and logs")
    g.add_argument("--save-every", type=int, default=0, help="checkpoint every N optimizer steps (0: never)")
    g.add_argument("--keep-checkpoints", type=int, default=None)
    g.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    g.add_argument("--no-progress", action="store_true")
    g.add_argument("--no-tensorboard", action="store_true")
    g.add_argument(
        "--debug-param-hash", action="store_true", help="each rank writes a hash of its parameters"
    )
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def config_from_args(args: argparse.Namespace):
    from offline_kd.train import TrainConfig

    storage_options = dict(kv.split("=", 1) for kv in args.storage_option) or None
    return TrainConfig(
        store=args.store,
        student=args.student,
        output=args.output,
        deepspeed_config=args.deepspeed_config,
        teacher=args.teacher,
        init_layers=args.init_layers,
        init_from_teacher=args.init_from_teacher,
        hidden_projection=args.hidden_projection,
        alpha_ce=args.alpha_ce,
        alpha_mlm=args.alpha_mlm,
        alpha_cos=args.alpha_cos,
        temperature=args.temperature,
        kl_tail=args.kl_tail,
        restrict_kl_to_mask=args.restrict_kl_to_mask,
        epochs=args.epochs,
        max_steps=args.max_steps,
        schedule_steps=args.schedule_steps,
        micro_batch_size=args.micro_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        lr=args.lr,
        warmup_fraction=args.warmup_fraction,
        seed=args.seed,
        num_workers=args.num_workers,
        buffer_chunks=args.buffer_chunks,
        storage_options=storage_options,
        save_every=args.save_every,
        keep_checkpoints=args.keep_checkpoints,
        resume=args.resume,
        progress=not args.no_progress,
        tensorboard=not args.no_tensorboard,
        debug_param_hash=args.debug_param_hash,
        local_rank=args.local_rank,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from offline_kd.student import StudentError
    from offline_kd.train import NonFiniteLossError, train

    try:
        result = train(config_from_args(args))
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
