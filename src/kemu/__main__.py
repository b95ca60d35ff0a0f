"""``python -m kemu``: the ``kemu`` command."""

import sys

from kemu.cli import main

sys.exit(main())
