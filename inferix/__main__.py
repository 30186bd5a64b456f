"""``python -m inferix ...``: the same as the ``inferix`` command."""
import sys

from .cli import main

sys.exit(main())
