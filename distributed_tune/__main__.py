"""`python -m distributed_tune ...`: see distributed_tune/cli.py."""

import sys

# First, before torch and transformers load (seconds): a SLURM warning or Ctrl-C that arrives
# while Python is still importing must not be lost.
from distributed_tune import signals

signals.install()

from distributed_tune.cli import main  # noqa: E402

sys.exit(main())
