"""``python -m distilkit``: the ``distilkit`` command."""

from distilkit.cli import main

main()
