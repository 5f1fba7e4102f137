"""`python -m distributed_tune ...`: see distributed_tune/cli.py."""

import sys

from distributed_tune.cli import main

sys.exit(main())
