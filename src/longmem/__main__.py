"""``python -m longmem``: the ``longmem`` command."""

from longmem.cli import main

raise SystemExit(main())
