"""``python -m inferix.app [--model tiny] [--port 7860]``: the demo without the ``inferix`` entry point."""
import sys

from .cli import main

sys.exit(main())
