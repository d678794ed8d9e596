"""`deepspeed cli/train.py ...` from a checkout: the same program as `deepspeed --module offline_kd.cli.train`.

This folder is deliberately not a package (no ``__init__.py``): a checkout's root is on ``sys.path`` under
``python -m``, and a regular package named ``cli`` there would shadow any installed distribution of that
name (docs/layout.md).
"""

import sys

from offline_kd.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
