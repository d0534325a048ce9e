"""Progress bars where the work is long, none where it is not.

``datasets`` and ``transformers`` draw a bar for every map and every model load, however short: on the
quickstart that is a line per file of noise around the one bar that matters (training's). Their bars are
switched off for a job below a size (:data:`LONG_DOCUMENTS` documents to tokenize or filter,
:data:`LONG_TEXT_BYTES` of text files to read, :data:`LONG_LOAD_BYTES` of weights to load) and left as they
were for a longer one.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import datasets
from transformers.utils import logging as transformers_logging

#: Tokenizing fewer documents than this takes seconds: no bar.
LONG_DOCUMENTS = 10_000
#: Loading fewer bytes of weights than this takes seconds: no bar.
LONG_LOAD_BYTES = 2**30
#: Reading fewer bytes of text files than this takes seconds: no bar.
LONG_TEXT_BYTES = 2**28


@contextmanager
def bars_if(long: bool) -> Iterator[None]:
    """``datasets``' and ``transformers``' progress bars as they are when ``long``, off otherwise (restored
    on exit)."""
    if long:
        yield
        return
    datasets_off = datasets.utils.are_progress_bars_disabled()
    transformers_on = transformers_logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if not datasets_off:
            datasets.enable_progress_bars()
        if transformers_on:
            transformers_logging.enable_progress_bar()
