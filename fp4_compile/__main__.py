"""``python -m fp4_compile``: the ``fp4c`` command line."""

import sys

from .cli import main

sys.exit(main())
