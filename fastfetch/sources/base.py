"""What every source recipe provides: a plan of work units, and the items of one unit.

A source knows where a dataset lives and how its captions are joined to its images; it knows
nothing about resizing, MDS or the manifest. The pipeline asks it for ``plan()`` once per run and
for ``items(unit)`` once per unit it runs; items either carry a URL for the fetcher or the image
bytes themselves (archive members).
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Final

from fastfetch.body import Body
from fastfetch.formats import OutputFormat

if TYPE_CHECKING:
    from fastfetch.http import Fetcher

#: unit-spec keys the pipeline and the manifest read (a source's own keys are its business)
RETRY_OF: Final = "retry_of"  # a --retry-failed unit: the id of the unit whose failed items it refetches
PREFILTERED: Final = "prefiltered"  # rows the plan already rejected, by reason (counted into the unit)


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

    @property
    def retry_of(self) -> str | None:
        """The unit whose failed items this unit refetches (a ``--retry-failed`` unit), or None."""
        return self.spec.get(RETRY_OF)

    @property
    def prefiltered(self) -> dict[str, int]:
        return dict(self.spec.get(PREFILTERED, {}))

    @classmethod
    def retry(cls, original: str, attempt: int, rows: int) -> Unit:
        return cls(f"{original}-retry{attempt}", {RETRY_OF: original}, rows)


def flag(default: Any, help: str, **argparse_kwargs: Any) -> Any:
    """A field of a source's options and the CLI flag that sets it (``--<field-name>``)."""
    return field(default=default, metadata={"argparse": {"default": default, "help": help, **argparse_kwargs}})


@dataclass(frozen=True, slots=True)
class SourceOptions:
    """A source's own settings, each declared with ``flag``: the CLI adds the flags and builds
    the options from them; the source never sees the command line."""

    @classmethod
    def add_arguments(cls, group: argparse._ArgumentGroup, own_only: bool = False) -> None:
        """Add the flags of the fields (``own_only``: only those this class declares itself, not
        inherited ones). A flag several sources share is added once: the CLI adds every source's
        own flags first, so a shared flag shows in the group of the source that declares it."""
        own = cls.__dict__.get("__annotations__", {})
        for f in fields(cls):
            name = "--" + f.name.replace("_", "-")
            if name not in group._option_string_actions and (f.name in own or not own_only):
                group.add_argument(name, **f.metadata["argparse"])

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace) -> SourceOptions:
        return cls(**{f.name: _frozen(getattr(ns, f.name)) for f in fields(cls)})

    def resolved(self) -> SourceOptions:
        """The options with local paths made absolute (for processes that run in other folders)."""
        return self


def _frozen(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


@dataclass(frozen=True, slots=True)
class RunContext:
    """What a source may use while planning and producing items: the run's own settings that
    concern sources, and its resources."""

    local_root: Path  # the run's local folder (--out, or --local-cache for a remote --out)
    fetcher: Fetcher
    work_dir: Path  # scratch space under local_root for this source (lists, spooled archives)
    min_size: int = 256
    unit_size: int = 10_000  # rows of a URL list per unit
    limit: int | None = None  # only the first rows of a URL list
    format: OutputFormat = OutputFormat.FASTFETCH
    max_aspect_ratio: float | None = None  # lists with listed sizes drop the rows above it before downloading


class Source:
    """Base class of the source recipes (see ``fastfetch/sources/__init__.py`` for the registry)."""

    name: ClassVar[str]
    help: ClassVar[str]
    #: extra MDS columns this source writes, name → MDS encoding
    columns: ClassVar[dict[str, str]] = {}
    #: --min-size when the user gives none (an evaluation set keeps every image: 0)
    default_min_size: ClassVar[int] = 256
    #: the source's own settings and flags
    Options: ClassVar[type[SourceOptions]] = SourceOptions
    #: the source serves its own images on 127.0.0.1 (the demo): private addresses are allowed
    serves_locally: ClassVar[bool] = False

    def __init__(self, options: SourceOptions, ctx: RunContext) -> None:
        if not isinstance(options, self.Options):
            raise TypeError(f"{type(self).__name__} takes {self.Options.__name__}, not {type(options).__name__}")
        self.options = options
        self.ctx = ctx

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

    def discard_leftovers(self) -> None:
        """Before planning, in the run's one driver: remove what a killed run left in the work
        folder (spooled downloads). Never called where units run, which may be many at once."""

    def unit_payload(self, unit: Unit) -> Any:
        """What ``items(unit)`` needs that a process elsewhere cannot read for itself (a URL
        list's rows: the plan's unit file lives with the driver), picklable; None: nothing."""
        return None

    async def prepare_unit(self, unit: Unit, payload: Any) -> None:
        """In a process that did not plan (a task on another node): get ready for
        ``items(unit)``, given ``unit_payload(unit)``. Default: plan (sources cache their plan
        and their caption lookups under the work folder)."""
        await self.plan()

    async def plan(self) -> list[Unit]:
        """All work units of the dataset, in a deterministic order."""
        raise NotImplementedError

    async def plan_batches(self) -> AsyncIterator[list[Unit]]:
        """The same units in the same order, in batches as they are planned, so that a run can
        start on the first units of a long plan while the rest is planned (URL lists: one
        batch per few units cut). ``extra_columns`` is known once the first batch is out.
        Default: the whole plan as one batch."""
        yield await self.plan()

    def items(self, unit: Unit) -> AsyncIterator[Item]:
        """The items of one unit (an async generator)."""
        raise NotImplementedError
