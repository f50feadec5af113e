"""``python -m lorarecipe`` = the ``lorarecipe`` command."""

import sys

from .cli import main

sys.exit(main())
