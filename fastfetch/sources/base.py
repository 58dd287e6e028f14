"""What every source recipe provides: a plan of work units, and the items of one unit.

A source knows where a dataset lives and how its captions are joined to its images; it knows
nothing about resizing, MDS or the manifest. The pipeline asks it for ``plan()`` once per run and
for ``items(unit)`` once per unit it runs; items either carry a URL for the fetcher or the image
bytes themselves (archive members).
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from fastfetch.body import Body

if TYPE_CHECKING:
    from fastfetch.http import Fetcher


@dataclass(slots=True)
class Item:
    """One candidate image with its caption.

    Exactly one of ``url`` and ``data`` is set. ``reject`` pre-empts all work: the item is
    counted under that reason (``no_caption``, ``nsfw``, …) and nothing is fetched.
    """

    key: str
    caption: str | None
    url: str | None = None
    data: Body | None = None  # bytes, or the pieces of received chunks (fastfetch.body)
    extra: dict[str, Any] = field(default_factory=dict)
    reject: str | None = None


@dataclass(frozen=True, slots=True)
class Unit:
    """A piece of work committed as a whole: one archive, one chunk of a URL list.

    ``spec`` holds everything needed to produce the unit's items (JSON-serialisable); when a
    rerun plans a unit with a different spec, the unit is redone.
    """

    id: str
    spec: dict[str, Any]
    rows: int | None = None  # number of items when known in advance (progress bar total)


@dataclass(slots=True)
class RunContext:
    """What a source may use while producing items."""

    out: Path
    fetcher: Fetcher
    work_dir: Path  # scratch space under --out for this source (lists, spooled archives)
    args: argparse.Namespace


class Source:
    """Base class of the source recipes (see ``fastfetch/sources/__init__.py`` for the registry)."""

    name: ClassVar[str]
    help: ClassVar[str]
    #: extra MDS columns this source writes, name → MDS encoding
    columns: ClassVar[dict[str, str]] = {}
    #: --min-size when the user gives none (an evaluation set keeps every image: 0)
    default_min_size: ClassVar[int] = 256

    def __init__(self, args: argparse.Namespace, ctx: RunContext) -> None:
        self.args = args
        self.ctx = ctx

    @classmethod
    def add_arguments(cls, group: argparse._ArgumentGroup) -> None:
        """Add this source's own flags (called for every source when the parser is built)."""

    def extra_columns(self) -> dict[str, str]:
        """Extra MDS columns for this run (may depend on arguments such as ``--keep-cols``)."""
        return dict(self.columns)

    async def open(self) -> None:
        """Acquire what the source needs while the run lasts (a local server, a session)."""

    async def close(self) -> None:
        """Release what ``open`` acquired."""

    def fingerprint(self) -> dict[str, Any]:
        """Arguments that change what a unit produces: a rerun with different ones is refused."""
        return {}

    async def plan(self) -> list[Unit]:
        """All work units of the dataset, in a deterministic order."""
        raise NotImplementedError

    def items(self, unit: Unit) -> AsyncIterator[Item]:
        """The items of one unit (an async generator)."""
        raise NotImplementedError
