"""CC12M caption cleaning, identical to the seed's.

The seed (SonyResearch/micro_diffusion) cleans every CC12M caption before it tokenizes it and
writes it next to the precomputed latents, with the DeepFloyd IF caption cleaner run twice
(``micro_diffusion/datasets/captions.py``, ``CaptionProcessor.clean_caption``). Our CC12M
latents must carry the very same caption text, byte for byte, so ``clean_caption`` repeats that
cleaner step for step: the same regular expressions in the same order, ftfy and a double HTML
unescape in the middle of each pass, BeautifulSoup's ``html.parser`` to drop markup, two passes.
Its quirks are kept on purpose (the ``&quot;`` and ``&amp`` removals happen before unescaping,
lower-casing happens before ftfy, a ``strip`` whose result was thrown away stays a no-op).

No package ships this cleaner on its own (it lives inside diffusers' IF pipeline and in the
seed), so it is written out here; ftfy and beautifulsoup4 are the only dependencies, as in the
seed. Import this module only where cleaning is on.
"""

from __future__ import annotations

import html
import re
import warnings
from urllib.parse import unquote_plus

import ftfy
from bs4 import BeautifulSoup, MarkupResemblesLocatorWarning

__all__ = ["clean_caption"]

# Captions that look like a URL or a file name make BeautifulSoup warn; the text is parsed all
# the same, so the warning is noise here (and only here: the filter is scoped to this module).
warnings.filterwarnings("ignore", category=MarkupResemblesLocatorWarning, module=__name__)

_MEDIA = r"(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)"
_BARE_HOST = r"[a-zA-Z0-9.\-]+[.](?:com|co|ru|net|org|edu|gov|it)[\w/-]*\b\/?(?!@)"


def _steps(*pairs: tuple[str, str]) -> tuple[tuple[re.Pattern[str], str], ...]:
    return tuple((re.compile(pattern), repl) for pattern, repl in pairs)


# Before markup is stripped: the <person> placeholder, then URLs (scheme or "www:" forms, and
# bare host names on a few TLDs).
_BEFORE_HTML = _steps(
    (r"<person>", "person"),
    (r"\b((?:https?:(?:\/{1,3}|[a-zA-Z0-9%])|" + _BARE_HOST + r"))", ""),
    (r"\b((?:www:(?:\/{1,3}|[a-zA-Z0-9%])|" + _BARE_HOST + r"))", ""),
)

# Between markup stripping and the ftfy/unescape step.
_BEFORE_FIX = _steps(
    (r"@[\w\d]+\b", ""),  # @handles
    # CJK strokes .. unified ideographs (U+31C0-U+9FFF); the seed deletes these seven
    # adjacent blocks one by one, which deletes exactly the same characters.
    (r"[\u31c0-\u9fff]+", ""),
    (
        r"[\u002D\u058A\u05BE\u1400\u1806\u2010-\u2015\u2E17\u2E1A\u2E3A\u2E3B\u2E40"
        r"\u301C\u3030\u30A0\uFE31\uFE32\uFE58\uFE63\uFF0D]+",
        "-",
    ),  # every dash -> "-"
    (r"[`´«»“”¨]", '"'),
    (r"[‘’]", "'"),
    (r"&quot;?", ""),
    (r"&amp", ""),
    (r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}", " "),  # IPv4 addresses
    (r"\d:\d\d\s+$", ""),  # trailing article ids
    (r"\\n", " "),  # a literal backslash-n
    (r"#\d{1,3}\b", ""),
    (r"#\d{5,}\b", ""),
    (r"\b\d{6,}\b", ""),
    (r"[\S]+\." + _MEDIA, ""),  # file names
    (r"[\"\']{2,}", '"'),
    (r"[\.]{2,}", " "),
    (r"[#®•©™&@·º½¾¿¡§~\)\(\]\[\}\{\|\\\/\*]{1,}", " "),  # stray punctuation
    (r"\s+\.\s+", " "),
)

_DASH_OR_UNDERSCORE = re.compile(r"[-_]")

# After ftfy/unescape: product codes, shop boilerplate, sizes, then spacing and edge punctuation.
_AFTER_FIX = _steps(
    (r"\b[a-zA-Z]{1,3}\d{3,15}\b", ""),  # jc6640
    (r"\b[a-zA-Z]+\d+[a-zA-Z]+\b", ""),  # jc6640vc
    (r"\b\d+[a-zA-Z]+\d+\b", ""),  # 6640vc231
    (r"(worldwide\s+)?(free\s+)?shipping", ""),
    (r"(free\s)?download(\sfree)?", ""),
    (r"\bclick\b\s(?:for|on)\s\w+", ""),
    (r"\b" + _MEDIA + r"(\simage[s]?)?", ""),
    (r"\bpage\s+\d+\b", ""),
    (r"\b\d*[a-zA-Z]+\d+[a-zA-Z]+\d+[a-zA-Z\d]*\b", " "),  # j2d1a2a
    (r"\b\d+\.?\d*[xх×]\d+\.?\d*\b", ""),  # 1920x1080 (Latin, Cyrillic x, ×)
    (r"\b\s+\:\s+", ": "),
    (r"(\D[,\./])\b", r"\1 "),
    (r"\s+", " "),
    (r"^[\"\']([\w\W]+)[\"\']$", r"\1"),  # one pair of enclosing quotes
    (r"^[\'\_,\-\:;]", ""),
    (r"[\'\_,\-\:\-\+]$", ""),
    (r"^\.\S+$", ""),
)


def _apply(steps: tuple[tuple[re.Pattern[str], str], ...], text: str) -> str:
    for pattern, repl in steps:
        text = pattern.sub(repl, text)
    return text


def _one_pass(text: str) -> str:
    text = unquote_plus(str(text)).strip().lower()
    text = _apply(_BEFORE_HTML, text)
    text = BeautifulSoup(text, features="html.parser").text
    text = _apply(_BEFORE_FIX, text)
    if len(_DASH_OR_UNDERSCORE.findall(text)) > 3:  # this-is-my-cat, this_is_my_cat
        text = _DASH_OR_UNDERSCORE.sub(" ", text)
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return _apply(_AFTER_FIX, text).strip()


def clean_caption(text: str) -> str:
    """Return ``text`` cleaned exactly as the seed cleans a CC12M caption (two passes)."""
    return _one_pass(_one_pass(text))
