"""``python -m hsam ...`` (and ``torchrun -m hsam segment ...``): the ``hsam`` command."""

import sys

from .cli import main

sys.exit(main())
