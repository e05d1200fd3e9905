"""``python -m memlayers`` is the ``memlayers`` command (also what ``torchrun -m memlayers train ...`` runs)."""

from .cli import main

raise SystemExit(main())
