"""The `kd` command: a thin click layer over the offline_kd library."""

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="offline-kd")
def main() -> None:
    """Offline knowledge distillation for BERT-style masked language models."""


from offline_kd.cli.commands_eval import demo_command, eval_command  # noqa: E402

main.add_command(eval_command)
main.add_command(demo_command)
from offline_kd.cli.commands_store import register as register_store_commands  # noqa: E402

register_store_commands(main)  # precompute, inspect, verify

if __name__ == "__main__":
    main()
