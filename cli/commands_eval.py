"""`kd eval` and `kd demo`."""

from __future__ import annotations

import json

import click


@click.command("eval")
@click.option("--model", "model", required=True, help="Masked-LM directory (save_pretrained) to score.")
@click.option("--corpus", "corpus", required=True, multiple=True, help="Held-out text/jsonl/parquet file(s).")
@click.option("--teacher", default=None, help="Also report top-1 agreement and KL(teacher||model) at T=1.")
@click.option("--text-field", default=None, help="Field holding the text in jsonl/parquet records.")
@click.option("--max-length", default=128, show_default=True, type=int)
@click.option("--seed", default=0, show_default=True, type=int, help="Masking seed.")
@click.option("--batch-size", default=16, show_default=True, type=int)
@click.option("--max-sequences", default=None, type=int, help="Score only the first N packed sequences.")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available).")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable dict.")
def eval_command(as_json: bool, corpus: tuple[str, ...], **kwargs) -> None:
    """Score a masked LM on held-out text with deterministic 15% masking."""
    from offline_kd.evaluate import EvalConfig, evaluate, format_table

    result = evaluate(EvalConfig(corpus=list(corpus), **kwargs))
    if as_json:
        click.echo(json.dumps(result.as_dict(), indent=2))
    else:
        click.echo(format_table({kwargs["model"]: result}))


@click.command("demo")
@click.option("--output", default="runs/demo", show_default=True, help="Directory for every artifact.")
@click.option(
    "--budget",
    type=click.Choice(["full", "tiny"]),
    default="full",
    show_default=True,
    help="tiny: a smoke run in about a minute (what CI runs).",
)
def demo_command(output: str, budget: str) -> None:
    """Fit a small teacher, precompute a store, train a student with DeepSpeed, export and evaluate it."""
    from offline_kd.demo import run_demo

    run_demo(output, budget=budget)
