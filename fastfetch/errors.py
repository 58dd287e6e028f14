"""The error every module raises for input a user can fix, and the names rejections are counted by.

Every rejected item is counted under one reason (``stats.json``'s ``rejected``, the manifest's
per-unit counts). The reasons are plain strings on disk; in code they come from ``Reason``, and
``REASONS`` says for each what it means and whether it is transient (worth another try with
``--retry-failed``: the same request may succeed later) or a property of the item.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final


class UsageError(Exception):
    """Bad arguments or unusable input: the message says what is wrong and what to do (exit 2)."""


def changes(before: Mapping[str, Any], after: Mapping[str, Any], show: Callable[[Any], str] = repr, absent: Any = None) -> str:
    """``key: old → new`` for every key whose value differs, in key order (for a refusal that
    names what changed)."""
    return ", ".join(
        f"{k}: {show(before.get(k, absent))} → {show(after.get(k, absent))}"
        for k in sorted(set(before) | set(after))
        if before.get(k, absent) != after.get(k, absent)
    )


@dataclass(frozen=True, slots=True)
class ReasonInfo:
    meaning: str
    transient: bool = False


class Reason:
    """The reason names, as constants (``http_<status>`` comes from ``http_status``)."""

    # network (fastfetch.http)
    TIMEOUT: Final = "timeout"
    CONNECTION: Final = "connection"
    HTTP_5XX: Final = "http_5xx"
    HTTP_429: Final = "http_429"
    MEMORY_LIMIT: Final = "memory_limit"
    TOO_LARGE: Final = "too_large"
    BAD_ENCODING: Final = "bad_encoding"
    BAD_RESPONSE: Final = "bad_response"
    INVALID_URL: Final = "invalid_url"
    BAD_SCHEME: Final = "bad_scheme"
    PRIVATE_ADDRESS: Final = "private_address"
    TOO_MANY_REDIRECTS: Final = "too_many_redirects"
    ROBOTS_OPTOUT: Final = "robots_optout"
    ROBOTS_TXT: Final = "robots_txt"
    ROBOTS_TXT_UNAVAILABLE: Final = "robots_txt_unavailable"
    # images (fastfetch.imaging)
    NOT_AN_IMAGE: Final = "not_an_image"
    DECODE_ERROR: Final = "decode_error"
    DECOMPRESSION_BOMB: Final = "decompression_bomb"
    TOO_SMALL: Final = "too_small"
    ASPECT_RATIO: Final = "aspect_ratio"
    # content dedup (fastfetch.dedup)
    DUPLICATE_CONTENT: Final = "duplicate_content"
    NEAR_DUPLICATE: Final = "near_duplicate"
    # archive members (fastfetch.archive)
    CORRUPT: Final = "corrupt"
    ZIP_BOMB: Final = "zip_bomb"
    ENCRYPTED: Final = "encrypted"
    UNSUPPORTED_COMPRESSION: Final = "unsupported_compression"
    SPARSE_MEMBER: Final = "sparse_member"
    DUPLICATE_KEY: Final = "duplicate_key"
    # rows and captions (the sources)
    NO_CAPTION: Final = "no_caption"
    NO_IMAGE: Final = "no_image"
    DUPLICATE: Final = "duplicate"
    DUPLICATE_URL: Final = "duplicate_url"
    NSFW: Final = "nsfw"
    UNLISTED: Final = "unlisted"
    PUNSAFE: Final = "punsafe"
    PWATERMARK: Final = "pwatermark"
    LOW_AESTHETIC: Final = "low_aesthetic"
    LISTED_TOO_SMALL: Final = "listed_too_small"


R = Reason
REASONS: Final[dict[str, ReasonInfo]] = {
    R.TIMEOUT: ReasonInfo("no answer within --timeout", transient=True),
    R.CONNECTION: ReasonInfo("the connection failed or broke off", transient=True),
    R.HTTP_5XX: ReasonInfo("the server answered with a 5xx status", transient=True),
    R.HTTP_429: ReasonInfo("the server asked to slow down (429)", transient=True),
    R.MEMORY_LIMIT: ReasonInfo("the body did not fit in --max-inflight-mb at the time", transient=True),
    R.TOO_LARGE: ReasonInfo("larger than --max-bytes (an archive member: larger than it can hold)"),
    R.BAD_ENCODING: ReasonInfo("the body does not match its Content-Encoding"),
    R.BAD_RESPONSE: ReasonInfo("a malformed HTTP response"),
    R.INVALID_URL: ReasonInfo("not a URL fastfetch can request"),
    R.BAD_SCHEME: ReasonInfo("not http or https"),
    R.PRIVATE_ADDRESS: ReasonInfo("the host is or resolves to a private address (--allow-private-networks)"),
    R.TOO_MANY_REDIRECTS: ReasonInfo("more than --max-redirects redirects"),
    R.ROBOTS_OPTOUT: ReasonInfo("X-Robots-Tag opts the image out (--ignore-robots)"),
    R.ROBOTS_TXT: ReasonInfo("the host's robots.txt disallows the URL to --user-agent (--respect-robots-txt)"),
    R.ROBOTS_TXT_UNAVAILABLE: ReasonInfo(
        "the host's robots.txt could not be read (5xx, unreachable): everything disallowed, as RFC 9309 asks", transient=True
    ),
    R.NOT_AN_IMAGE: ReasonInfo("the bytes are no image format Pillow knows"),
    R.DECODE_ERROR: ReasonInfo("an image that cannot be decoded (truncated, corrupt)"),
    R.DECOMPRESSION_BOMB: ReasonInfo("more pixels than any real image holds"),
    R.TOO_SMALL: ReasonInfo("short side below --min-size"),
    R.ASPECT_RATIO: ReasonInfo("long side over short side above --max-aspect-ratio (listed or real sizes)"),
    R.DUPLICATE_CONTENT: ReasonInfo("the same bytes as an image kept before it (--dedup)"),
    R.NEAR_DUPLICATE: ReasonInfo("a perceptual hash within a few bits of an image kept before it (--dedup near)"),
    R.CORRUPT: ReasonInfo("an archive member that cannot be read"),
    R.ZIP_BOMB: ReasonInfo("a zip member that inflates far beyond its stored size"),
    R.ENCRYPTED: ReasonInfo("an encrypted zip member"),
    R.UNSUPPORTED_COMPRESSION: ReasonInfo("a zip member compressed other than stored or deflate"),
    R.SPARSE_MEMBER: ReasonInfo("a sparse tar member (its stored bytes are not the file)"),
    R.DUPLICATE_KEY: ReasonInfo("a second item under a key already seen in the unit"),
    R.NO_CAPTION: ReasonInfo("no caption, or a blank one"),
    R.NO_IMAGE: ReasonInfo("a caption whose image the archive does not hold"),
    R.DUPLICATE: ReasonInfo("an image already taken from another split"),
    R.DUPLICATE_URL: ReasonInfo("a URL seen earlier in the list"),
    R.NSFW: ReasonInfo("above --max-nsfw"),
    R.UNLISTED: ReasonInfo("an archive image the dataset's metadata does not list"),
    R.PUNSAFE: ReasonInfo("listed punsafe above --max-punsafe"),
    R.PWATERMARK: ReasonInfo("listed pwatermark above --max-pwatermark"),
    R.LOW_AESTHETIC: ReasonInfo("listed aesthetic score below --min-aesthetic"),
    R.LISTED_TOO_SMALL: ReasonInfo("listed WIDTH/HEIGHT below --min-size: never downloaded"),
}
TRANSIENT: Final = frozenset(r for r, info in REASONS.items() if info.transient)


def http_status(status: int) -> str:
    """The reason of a final HTTP status: each 4xx by number, 5xx together."""
    return R.HTTP_5XX if status >= 500 else f"http_{status}"


def meaning(reason: str) -> str:
    """What a counted reason means (``http_<status>`` included)."""
    if reason in REASONS:
        return REASONS[reason].meaning
    if reason.startswith("http_") and reason[5:].isdigit():
        return f"the server answered with status {reason[5:]}"
    return "unknown reason"


def transient_names() -> str:
    """The transient reasons, for help texts."""
    return ", ".join(sorted(TRANSIENT))
