"""`kd eval` and `kd demo`."""

from __future__ import annotations

import json

import click

from offline_kd.runtime.options import click_options, from_click_params
from offline_kd.runtime.settings import DemoConfig, EvalConfig


@click.command("eval")
@click_options(EvalConfig)
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable dict.")
def eval_command(as_json: bool, **params) -> None:
    """Score a masked LM on held-out text with deterministic 15% masking."""
    from offline_kd.publish.evaluate import evaluate, format_table

    cfg = from_click_params(EvalConfig, params)
    result = evaluate(cfg)
    if cfg.update_card:
        from offline_kd.publish.model_card import update_eval

        source = ", ".join(cfg.corpus)
        card = update_eval(cfg.model, {**result.as_dict(), "source": source})
        click.echo(f"model card updated: {card}", err=True)
    if as_json:
        click.echo(json.dumps(result.as_dict(), indent=2))
    else:
        click.echo(format_table({cfg.model: result}))


@click.command("demo")
@click_options(DemoConfig)
def demo_command(**params) -> None:
    """Fit a small teacher, precompute a store, train a student with DeepSpeed, export and evaluate it."""
    from offline_kd.examples.demo import run_demo

    cfg = from_click_params(DemoConfig, params)
    run_demo(cfg.output, budget=cfg.budget)
