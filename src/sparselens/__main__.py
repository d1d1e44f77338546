"""``python -m sparselens`` (and ``torchrun -m sparselens``): the ``sparselens`` command."""

from sparselens.cli import main

raise SystemExit(main())
