"""Documents of the ``distilkit_python_reference`` task: the held-out part of ``builtin:python-reference``."""

from __future__ import annotations

from typing import Any

import datasets

from distilkit.data.corpus import builtin_documents
from distilkit.data.text import held_out_split


def held_out_documents(val_fraction: float = 0.1, seed: int = 0, **metadata: Any) -> datasets.DatasetDict:
    """The documents ``TextDataModule(train_files="builtin:python-reference", val_fraction, seed)`` holds
    out for validation, as the ``test`` split (columns ``title``, ``text``, ``source``). The harness passes
    the task's ``metadata`` too; it is not needed."""
    documents = builtin_documents("python-reference")
    _, held_out = held_out_split(len(documents), val_fraction, seed)
    return datasets.DatasetDict({"test": datasets.Dataset.from_list([documents[i] for i in held_out])})
