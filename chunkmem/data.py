"""Alias of :mod:`chunkmem.training.data` (the training data moved into the training package):
``import chunkmem.data`` and ``from chunkmem.data import ...`` keep working and give the same
module object."""
import sys

from chunkmem.training import data as _data

sys.modules[__name__] = _data
