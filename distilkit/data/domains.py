"""Which domain each document belongs to, carried token by token through packing.

A domain is named by a field of a document's row (``source`` in the built-in corpora; any field a recipe
names) or by the data file the row came from (``file``). :class:`DocumentDomains` gives every document an id
into one table of names shared by the splits (:attr:`DocumentDomains.names`, in order of first appearance),
and :class:`~distilkit.data.text.PackedBlocks` turns the documents' ids into one id per token. Several
teachers are routed by these ids, and validation logs ``val/<domain>/ppl`` by them. Token caches, blocks and
the data module's identity do not depend on them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import datasets
import numpy as np

from distilkit.data.sources import FILE_DOMAIN, document_domains, row_naming, source_name

__all__ = ["FILE_DOMAIN", "DocumentDomains", "requested_domains"]


class DocumentDomains:
    """The domains of a data module's documents.

    Args:
        field: the row field that names a document's domain, or :data:`FILE_DOMAIN`.
        given: per split, the files as the recipe gave them, and their resolved sources: a file's domain
            name (``file``) is :func:`~distilkit.data.sources.source_name` of what the recipe gave.
    """

    def __init__(self, field: str, given: Mapping[str, tuple[Any, list[str] | None]]) -> None:
        self.field = field
        self.names: list[str | None] = []  # id -> name; None: rows without the field
        self.source_names: dict[str, str] = {}
        self.sources: list[str] = []
        for files, sources in given.values():
            names = [] if files is None else [files] if isinstance(files, str) else list(files)
            for name, source in zip(names, sources or [], strict=True):
                self.source_names[source] = source_name(name)
                self.sources.append(source)

    def column(
        self, docs: datasets.Dataset, sources: list[str], field: str, **loading: Any
    ) -> datasets.Dataset:
        """``docs`` (the tokenized documents of ``sources``, in order) with a ``domain`` column of ids.

        Args:
            docs: one row per document.
            sources: the resolved sources they were read from.
            field: the config field of the sources, named in errors.
            loading: ``text_field``, ``cache_dir`` and ``skip_missing_text`` as the documents were read.
        """
        values = document_domains(sources, field, domains=self.field, names=self.source_names, **loading)
        if len(values) != len(docs):
            raise RuntimeError(f"{field}: {len(values)} domains for {len(docs)} documents")
        ids = {name: index for index, name in enumerate(self.names)}
        for value in values:
            if value not in ids:
                ids[value] = len(self.names)
                self.names.append(value)
        return docs.add_column("domain", [ids[value] for value in values])

    def row(self, name: str | None) -> str:
        """Where the first row of domain ``name`` is (``file:line`` for jsonl), for an error to name it."""
        return row_naming(self.sources, self.field, name, self.source_names)

    def tokens(self, blocks: Any) -> dict[str | None, int]:
        """``{name: tokens}`` in ``blocks`` (:class:`~distilkit.data.text.PackedBlocks` with domains), leaving
        out domains without tokens."""
        if getattr(blocks, "domains", None) is None:
            return {}
        counts = np.bincount(blocks.domains[blocks.valid].numpy(), minlength=len(self.names))
        return {self.names[index]: int(count) for index, count in enumerate(counts) if count}


def requested_domains(trainer: Any) -> str | None:
    """What the module ``trainer`` trains asks its data to carry: its ``domains`` attribute (a row field, or
    :data:`FILE_DOMAIN`), or None (no trainer, no module, nothing asked)."""
    try:
        module = trainer.lightning_module if trainer is not None else None
    except (AttributeError, RuntimeError):
        module = None
    wanted = getattr(module, "domains", None)
    return wanted if isinstance(wanted, str) and wanted else None


def domain_ids(docs: datasets.Dataset) -> np.ndarray | None:
    """``(documents,)`` the ``domain`` column of ``docs``, or None without one."""
    return np.asarray(docs["domain"], dtype=np.int32) if "domain" in docs.column_names else None
