"""One progress-bar policy for the long stages: lively on a terminal, a line every 30 s in
logs and CI (a redirected bar otherwise writes a line per update)."""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm

__all__ = ["progress_bar"]


def progress_bar(*, enabled: bool = True, **kwargs: Any) -> tqdm:
    interactive = sys.stderr.isatty()
    return tqdm(disable=not enabled, mininterval=0.5 if interactive else 30.0, dynamic_ncols=interactive, **kwargs)
