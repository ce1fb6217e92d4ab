"""The ``sparsediff`` sub-commands, one module each (``add_arguments`` and ``run``); ``sparsediff.cli`` lists them."""
