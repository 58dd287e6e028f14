"""The registry of source recipes: ``--dataset NAME`` → the class that plans and reads it."""

from __future__ import annotations

from fastfetch.sources.base import Item, RunContext, Source, SourceOptions, Unit
from fastfetch.sources.cc12m import CC12MSource
from fastfetch.sources.coco import CocoSource
from fastfetch.sources.demo import DemoSource
from fastfetch.sources.diffdb import DiffusionDBSource
from fastfetch.sources.jdb import JourneyDBSource
from fastfetch.sources.sa1b import SA1BSource
from fastfetch.sources.textcaps import TextCapsSource
from fastfetch.sources.urls import LaionSource, UrlsSource

SOURCES: dict[str, type[Source]] = {cls.name: cls for cls in (DemoSource, UrlsSource, LaionSource)}
SOURCES.update(
    {cls.name: cls for cls in (CC12MSource, SA1BSource, JourneyDBSource, DiffusionDBSource, TextCapsSource, CocoSource)}
)

__all__ = ["SOURCES", "Item", "RunContext", "Source", "SourceOptions", "Unit"]
