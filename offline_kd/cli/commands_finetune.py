"""`kd finetune`."""

from __future__ import annotations

import click

from offline_kd.runtime.options import click_options, from_click_params
from offline_kd.runtime.settings import FinetuneConfig


@click.command("finetune")
@click_options(FinetuneConfig)
def finetune_command(**params) -> None:
    """Fine-tune models (students, the teacher) on downstream tasks and report each against the teacher."""
    from offline_kd.downstream.report import markdown
    from offline_kd.downstream.run import finetune

    cfg = from_click_params(FinetuneConfig, params)
    report = finetune(cfg)
    if report:
        click.echo(markdown(report))
