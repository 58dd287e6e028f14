"""pyarrow, imported on first use: ``from fastfetch.arrow import pa, pc, pacsv, pq``.

pyarrow (with numpy) is ~0.2 s of every start-up, which datasets read from archives never
need, and during which the resize workers wait for their first image.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING, Any


class LazyModule:
    """A module imported on first attribute access."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._module: ModuleType | None = None

    def __getattr__(self, attr: str) -> Any:
        if self._module is None:
            self._module = importlib.import_module(self._name)
        return getattr(self._module, attr)


if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq
else:
    pa, pc, pacsv, pq = (LazyModule(m) for m in ("pyarrow", "pyarrow.compute", "pyarrow.csv", "pyarrow.parquet"))
