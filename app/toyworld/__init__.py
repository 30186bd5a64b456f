"""The toy world's commands, which drive an engine: ``inferix toyworld eval`` (eval.py) and ``inferix train
toyworld | toyworld-decoder | toyworld-corrector`` (train_decoder.py, train_corrector.py; the first stage's trainer is
``inferix.models.toyworld.train``). They register through the ``inferix.commands`` entry-point group (cli.py), so
the engine's CLI never imports them. See docs/toyworld.md."""
