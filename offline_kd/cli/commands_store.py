"""`kd precompute`, `kd inspect`, `kd verify`: thin click wrappers over offline_kd.precompute/verify."""

from __future__ import annotations

import json

import click

from offline_kd.runtime.options import click_options, from_click_params
from offline_kd.runtime.settings import PrecomputeConfig, StoreAccess, VerifyConfig


def _storage_options(access: dict) -> dict | None:
    """The ``--storage-option`` pairs of a command's `StoreAccess` parameters."""
    return from_click_params(StoreAccess, access).storage_options


@click.command("precompute")
@click_options(PrecomputeConfig)
def precompute_cmd(**kw):
    """Run the teacher once over a corpus and write a signal store (resumable)."""
    from offline_kd.precompute.run import precompute

    res = precompute(from_click_params(PrecomputeConfig, kw))
    if res.dry_run:
        click.echo(
            "\n".join(["dry run (nothing written, no teacher weights loaded):"] + res.estimate.lines())
        )
        return
    click.echo(
        f"{res.url}: wrote {len(res.shards_written)} shard(s), skipped {len(res.shards_skipped)} already "
        f"committed; {res.num_shards} shards in all; {'complete' if res.complete else 'incomplete (other ranks)'}"
    )


@click.command("inspect")
@click.argument("store")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click_options(StoreAccess)
def inspect_cmd(store, as_json, **access):
    """Summarise a signal store."""
    from offline_kd.precompute.verify import format_summary, inspect_store

    info = inspect_store(store, _storage_options(access))
    click.echo(json.dumps(info, indent=2) if as_json else format_summary(info))


@click.command("verify")
@click.argument("store")
@click_options(VerifyConfig)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def verify_cmd(store, as_json, **params):
    """Decode every chunk (crc32c), check ranges and completeness; exit 1 naming what is bad."""
    from offline_kd.precompute.verify import verify_store
    from offline_kd.precompute.verify_exact import format_exact

    rep = verify_store(store, from_click_params(VerifyConfig, params))
    if as_json:
        click.echo(json.dumps(rep.as_dict(), indent=2))
    else:
        click.echo(
            f"checked {rep.checked_shards} shard(s) of {store}: {'complete' if rep.complete else 'INCOMPLETE'}"
        )
        if rep.teacher_max_abs_diff is not None:
            diffs = ", ".join(f"{k} {v:.3g}" for k, v in rep.teacher_max_abs_diff.items())
            click.echo(f"teacher rerun on {len(rep.sampled_sequences)} sequence(s): max abs diff {diffs}")
        if rep.exact is not None:
            click.echo(format_exact(rep.exact))
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
