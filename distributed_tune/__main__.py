"""`python -m distributed_tune ...`: see distributed_tune/cli.py."""

import sys

# First, before torch and transformers load (seconds): a SLURM warning or Ctrl-C that arrives
# while Python is still importing must not be lost.
from distributed_tune import signals

signals.install()

from distributed_tune.cli import main  # noqa: E402

code = main()
if "torch.distributed" in sys.modules:
    # A gloo worker thread may still be releasing the last collective's tensors while the
    # interpreter finalizes; it cannot take the GIL then, and the process aborts ("terminate called
    # without an active exception", SIGABRT) after a run that succeeded: ~1 in 8 two-process runs
    # here, a FAILED SLURM job (pytorch/pytorch#190489). Run the exit handlers, flush, and leave
    # without the interpreter's final teardown.
    import atexit
    import os

    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
