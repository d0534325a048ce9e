"""The ``distilkit`` commands, one module each; :mod:`distilkit.cli` lists them in one table."""
