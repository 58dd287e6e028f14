"""Keep secrets out of everything we print or store (logs, stats.json, the manifest, MDS rows).

Signed URLs (SA-1B's CDN links, S3 presigned URLs) carry credentials in their query string,
URLs may carry ``user:password@`` userinfo, and tokens from the environment can end up in
library exception messages. Two rules, applied where text leaves a run:

- ``redact(text)`` for messages (errors, the manifest's unit errors, stats.json): every query
  string, every userinfo, bearer and ``hf_…`` tokens and the values of secret variables go.
- ``public_url(url)`` for the ``url`` column of a dataset: the URL stays useful (its query is
  part of what it names), but userinfo, ``hf_…`` tokens and the values of query parameters that
  carry credentials (signatures, tokens, keys, policies) are replaced.

What a retry needs is never a URL: the manifest keeps row keys, and the URLs stay in the plan's
own copy of the list under ``OUT/_work/``.
"""

from __future__ import annotations

import os
import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

_SECRET_ENV = (
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_ACCESS_KEY_ID",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "AZURE_STORAGE_KEY",
    "S3_SECRET_KEY",
)
REDACTED = "<redacted>"
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^\s/?#@'\"<>]+@")
_URL_QUERY = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^\s?#'\"<>]+)\?[^\s'\"<>]*")
_BEARER = re.compile(r"(?i)(authorization['\"]?\s*[:=]\s*['\"]?\s*bearer\s+)[^\s'\",}]+")
_HF_TOKEN = re.compile(r"\bhf_[A-Za-z0-9]{20,}\b")
#: query parameters whose value is a credential, matched case-insensitively anywhere in the name
#: (``auth_token``, ``client_secret``, ``api-key``, ``X-Amz-Signature``) or as the whole name
#: (``sig``, ``key``, CloudFront's ``Policy``/``Key-Pair-Id``, Meta's CDN ``oh``)
_SECRET_PARAMS = re.compile(
    r"(?i)(token|secret|passw|signature|credential|api[-_]?key|access[-_]?key|private[-_]?key|session[-_]?id"
    r"|authorization|(^|[-_])auth($|[-_])|^(x-amz|x-goog)-|^(sig|key|policy|key-pair-id|oh|hmac)$)"
)


def redact(text: str) -> str:
    """``text`` with query strings, userinfo, bearer tokens and known secret values replaced."""
    text = _URL_QUERY.sub(rf"\1?{REDACTED}", text)
    text = _USERINFO.sub(rf"\1{REDACTED}@", text)
    text = _BEARER.sub(rf"\1{REDACTED}", text)
    text = _HF_TOKEN.sub(REDACTED, text)
    for name in _SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 8:
            text = text.replace(value, REDACTED)
    return text


def public_url(url: str) -> str:
    """``url`` as a dataset may store it: no userinfo, no credential-bearing query values."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return redact(url)
    netloc = parts.netloc.rpartition("@")[2] if "@" in parts.netloc else parts.netloc
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(_SECRET_PARAMS.search(k) for k, _ in pairs):
            query = urlencode([(k, REDACTED if _SECRET_PARAMS.search(k) else v) for k, v in pairs], safe="<>")
    cleaned = urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    return _HF_TOKEN.sub(REDACTED, cleaned)
