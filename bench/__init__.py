"""chunkmem benchmarks: throughput and memory of the hybrid attention op and the model vs peers.

Run ``python -m bench`` (see bench/README.md). Not part of the installed package and not part of
the default test run (pyproject's ``testpaths = ["tests"]``).

Importing this package sets ``OMP_WAIT_POLICY=PASSIVE`` (unless the environment sets it) so that
every ``python -m bench...`` entry point loads torch with idle OpenMP threads sleeping instead
of spinning: on a shared machine with more runnable threads than cores, spinning threads starve
each other and small ops get 10-50x slower.
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
