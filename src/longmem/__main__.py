"""``python -m longmem``: the ``longmem`` command."""

from longmem.cli import entry

entry()
