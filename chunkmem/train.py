"""``python -m chunkmem.train``: train, compare, evaluate and sample ChunkMemLM (one process, or
data-parallel under ``torchrun``). The code lives in :mod:`chunkmem.training`; ``--help`` lists
the subcommands, options and presets."""
import sys

from chunkmem.training import *  # noqa: F401,F403  (the names this module used to define)
from chunkmem.training import __all__  # noqa: F401
from chunkmem.training.cli import main

if __name__ == "__main__":
    sys.exit(main())
