"""`kd precompute`, `kd inspect`, `kd verify`: thin click wrappers over offline_kd.precompute/verify."""

from __future__ import annotations

import json

import click


def _floats(ctx, param, value):
    if value is None:
        return None
    try:
        return [float(x) for x in str(value).split(",") if x.strip()]
    except ValueError as e:
        raise click.BadParameter(f"expected comma-separated numbers, got {value!r}") from e


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:,.1f} {unit}"
        n /= 1000
    return f"{n:,.1f} TB"


@click.command("precompute")
@click.option("--teacher", required=True, help="HF masked-LM name or local directory.")
@click.option(
    "--corpus",
    "corpus",
    multiple=True,
    required=True,
    help="Text/jsonl/parquet file or hub dataset NAME[:CONFIG] (repeatable).",
)
@click.option("--output", required=True, help="Store path or fsspec URL (e.g. s3://bucket/store.zarr).")
@click.option("--text-field", default=None, help="Field holding the text in jsonl/parquet (default: text).")
@click.option("--max-length", default=512, show_default=True, type=int)
@click.option("--top-k", default=64, show_default=True, type=int)
@click.option("--temperatures", default="1,2", show_default=True, callback=_floats, help="Comma-separated.")
@click.option(
    "--views", default=1, show_default=True, type=int, help="Independently masked views per sequence."
)
@click.option("--hidden/--no-hidden", default=True, show_default=True, help="Store the last hidden state.")
@click.option(
    "--mask-smoothing", default=None, type=float, help="Rarity smoothing exponent (DistilBERT: 0.7)."
)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--batch-size", default=32, show_default=True, type=int)
@click.option(
    "--shard-size", default=256, show_default=True, type=int, help="Sequences per shard (unit of work)."
)
@click.option("--chunk-size", default=None, type=int, help="Sequences per chunk (default: ~2 MB chunks).")
@click.option(
    "--dtype",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
)
@click.option("--device", default=None, help="Default: cuda:$LOCAL_RANK if available, else cpu.")
@click.option("--rank", default=None, type=int, help="Default: $RANK or 0.")
@click.option("--world-size", default=None, type=int, help="Default: $WORLD_SIZE or 1.")
@click.option("--holdout", default=0.0, show_default=True, type=float, help="Fraction of documents held out.")
@click.option("--holdout-file", default=None, help="Write held-out documents here, one per line.")
@click.option("--overwrite", is_flag=True, help="Replace an existing store made with other settings.")
@click.option(
    "--dry-run", is_flag=True, help="Estimate the store size and check free disk space; write nothing."
)
@click.option("--trust-remote-code", is_flag=True)
@click.option("--revision", default=None)
@click.option("--no-progress", is_flag=True)
def precompute_cmd(**kw):
    """Run the teacher once over a corpus and write a signal store (resumable)."""
    from offline_kd.corpus import CorpusError
    from offline_kd.precompute import PrecomputeConfig, precompute
    from offline_kd.store import StoreError
    from offline_kd.teacher import TeacherError

    progress = not kw.pop("no_progress")
    kw["corpus"] = list(kw["corpus"])
    cfg = PrecomputeConfig(progress=progress, **kw)
    try:
        res = precompute(cfg)
    except (CorpusError, StoreError, TeacherError, ValueError) as e:
        raise click.ClickException(str(e)) from e
    if res.dry_run:
        click.echo(
            f"dry run: {res.num_sequences:,} sequences, {res.tokens:,} token positions, "
            f"{res.num_shards} shards; estimated store size {_human(res.estimated_bytes)} "
            f"(uncompressed upper bound); enough free space"
        )
        return
    click.echo(
        f"{res.url}: wrote {len(res.shards_written)} shard(s), skipped {len(res.shards_skipped)} already "
        f"committed; {res.num_shards} shards in all; {'complete' if res.complete else 'incomplete (other ranks)'}"
    )


@click.command("inspect")
@click.argument("store")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def inspect_cmd(store, as_json):
    """Summarise a signal store."""
    from offline_kd.store import StoreError
    from offline_kd.verify import format_summary, inspect_store

    try:
        info = inspect_store(store)
    except StoreError as e:
        raise click.ClickException(str(e)) from e
    click.echo(json.dumps(info, indent=2) if as_json else format_summary(info))


@click.command("verify")
@click.argument("store")
@click.option("--teacher", default=None, help="Rerun this teacher on sampled sequences and compare.")
@click.option("--sample", default=8, show_default=True, type=int, help="Sequences to rerun with --teacher.")
@click.option("--device", default=None)
@click.option(
    "--dtype",
    default="float32",
    show_default=True,
    type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
)
@click.option("--tolerance", default=1e-3, show_default=True, type=float, help="Max abs difference allowed.")
@click.option("--json", "as_json", is_flag=True)
def verify_cmd(store, teacher, sample, device, dtype, tolerance, as_json):
    """Decode every chunk (crc32c), check ranges and completeness; exit 1 naming what is bad."""
    from offline_kd.store import StoreError
    from offline_kd.verify import verify_store

    try:
        rep = verify_store(
            store, teacher=teacher, sample=sample, device=device, dtype=dtype, tolerance=tolerance
        )
    except StoreError as e:
        raise click.ClickException(str(e)) from e
    if as_json:
        click.echo(json.dumps(rep.as_dict(), indent=2))
    else:
        click.echo(
            f"checked {rep.checked_shards} shard(s) of {store}: {'complete' if rep.complete else 'INCOMPLETE'}"
        )
        if rep.teacher_max_abs_diff is not None:
            diffs = ", ".join(f"{k} {v:.3g}" for k, v in rep.teacher_max_abs_diff.items())
            click.echo(f"teacher rerun on {len(rep.sampled_sequences)} sequence(s): max abs diff {diffs}")
        for n in rep.notes:
            click.echo(f"note: {n}")
        for e in rep.errors:
            click.echo(f"ERROR: {e}", err=True)
        click.echo("OK" if rep.ok else f"FAILED: {len(rep.errors)} problem(s)")
    if not rep.ok:
        raise SystemExit(1)


COMMANDS = (precompute_cmd, inspect_cmd, verify_cmd)


def register(group: click.Group) -> None:
    for cmd in COMMANDS:
        group.add_command(cmd)
