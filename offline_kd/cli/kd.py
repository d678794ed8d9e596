"""The `kd` command: a thin click layer over the offline_kd library."""

import click

from offline_kd.runtime.errors import RunFailed, UsageError, report


class _CleanError(click.ClickException):
    """A `UsageError` or `RunFailed` as click shows it: one ``Error: ...`` line (rank 0 only)."""

    def __init__(self, error: UsageError | RunFailed):
        super().__init__(str(error))
        self.error = error
        self.exit_code = error.exit_code

    def show(self, file=None) -> None:
        report(self.error)


class _Group(click.Group):
    """Every command's user errors end as one ``Error: ...`` line and exit status 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (UsageError, RunFailed) as e:
            raise _CleanError(e) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="offline-kd")
def main() -> None:
    """Offline knowledge distillation for BERT-style masked language models."""


from offline_kd.cli.commands_eval import demo_command, eval_command  # noqa: E402

main.add_command(eval_command)
main.add_command(demo_command)
from offline_kd.cli.commands_store import register as register_store_commands  # noqa: E402

register_store_commands(main)  # precompute, inspect, verify
from offline_kd.cli.commands_finetune import finetune_command  # noqa: E402

main.add_command(finetune_command)

if __name__ == "__main__":
    main()
