"""``inferix toyworld eval`` and ``inferix train toyworld | toyworld-decoder | toyworld-corrector``: registered
through the ``inferix.commands`` entry-point group, so the engine's CLI never imports them. Each passes its
arguments (``-h`` included) on to its own parser, and imports its module only when it runs."""
from __future__ import annotations

import argparse
import sys

__all__ = ["register", "TRAIN_TARGETS"]

# target -> the module whose main(argv) trains it
TRAIN_TARGETS = {
    "toyworld": "inferix.models.toyworld.train",
    "toyworld-decoder": "inferix.app.toyworld.train_decoder",
    "toyworld-corrector": "inferix.app.toyworld.train_corrector",
}


def register(subparsers) -> None:
    t = subparsers.add_parser("train", help=f"train a model ({', '.join(TRAIN_TARGETS)})", add_help=False)
    t.add_argument("what")
    t.add_argument("args", nargs=argparse.REMAINDER)
    t.set_defaults(func=run_train)
    tw = subparsers.add_parser("toyworld", help="toy world tools (eval)", add_help=False)
    tw.add_argument("what", choices=["eval"])
    tw.add_argument("args", nargs=argparse.REMAINDER)
    tw.set_defaults(func=run_toyworld)


def run_train(a) -> int:
    import importlib
    if a.what not in TRAIN_TARGETS:
        print(f"error: unknown training target {a.what!r} (known: {', '.join(TRAIN_TARGETS)})", file=sys.stderr)
        return 2
    return importlib.import_module(TRAIN_TARGETS[a.what]).main(a.args) or 0


def run_toyworld(a) -> int:
    from .eval import main
    return main([a.what] + a.args) or 0
