"""One redaction rule for everything dspex_nb shows or sends back: errors, ``describe``, ``status``,
dashboards, magic output and logs.

A secret is a setting whose name looks like one (``*key*``, ``*token*`` but not a count of tokens such
as ``max_tokens``, ``*secret*``, ``*password*``, ``authorization``, ``*credential*``, ``cookie``) and the
value of every environment variable so named, and the password of a URL (``api_base="https://user:pw@host"``,
``HTTPS_PROXY``; as written and percent-decoded), which an error may quote without its scheme (``failed to connect
to user:pw@host``), and the value a pydantic ValidationError quotes for a field so named.
Values are replaced by ``***`` wherever they appear in text; settings so named are masked whole.
"""

from __future__ import annotations

import os
import re
import urllib.parse
from collections.abc import Mapping
from typing import Any

MASK = "***"
MAX_MESSAGE = 4000  # characters of an error message kept (a repr of a large object says little more)
SECRET_ROOM = 4096  # characters after those kept that are masked too: a secret cut by the end is masked whole
_SECRET_NAME = re.compile(r"key(?!word)|(?<!per_)token(?!s\b|s_|_count|izer)|secret|passw|authoriz|credential|cookie",
                          re.IGNORECASE)  # not counts (max_tokens, answer_tokens), nor the demo LM's per_token delay
# api_key='sk-...', "aws_secret_access_key": "...", ?key=..., Authorization: Bearer ... The match starts at the
# secret-like part of the name (what comes before it is kept as it is anyway) and the rest of the name is
# bounded: a pattern that scans a word in both directions takes quadratic time on a long one (a base64 blob
# in an error message: 10 KB took 5 s, with the GIL held, so a worker missed its pings and was killed). A name
# that ends as an exception class's does is no setting: "KeyError: 'answer'" in a traceback is the exception's text.
# A quoted value is masked whole, to its closing quote or its line's end (a password with a space or a comma in it,
# "Basic dXNl...", a private key's PEM), where the name ends as a secret's does (api_key, aws_secret_access_key,
# Authorization); where the name only holds such a word (key_points="Demo LM answer ...", a Prediction's field), a
# quoted value is masked only where it is one word.
_WORD = r"""[^'"\s,;&}\])]{4,}"""
_ASSIGNED = re.compile(
    r"""(?i)((?:key(?!word)|(?<!per_)token(?!s\b|s_|_count|izer)|secret|passw(?:or)?d|authoriz\w{0,64}|credential)"""
    r"""(?![\w-]{0,64}?(?:error|exception|warning)['"]?\s*[:=])([\w-]{0,64})['"]?\s*[:=]\s*(['"])?"""
    rf"""(?:bearer\s+)?)(?(3)((?:(?!\3).){{4,}})(?=\3|\n|\Z)|{_WORD})""")
_BEARER = re.compile(r"(?i)(bearer\s+)([^\s'\",;]{8,})")
_USERINFO = re.compile(r"(://[^\s/?#@:'\"]{0,256}:)([^\s/?#@'\"]{1,256})(?=@)")  # a URL's password (from the literal
# "://", which the regex engine finds fast: a scheme before it to match made a MB of text take 0.5 s)
# pydantic's ValidationError: a field's location on a line of its own, then its error quoting the value it was given
# ("api_key\n  Input should be a valid integer ... [type=int_parsing, input_value='sk-...', input_type=str]"), whose
# value pydantic cuts to 50 characters or so: bounded here, or a line of many "[type=x, input_value=" took each to its
# end (quadratic: 330 KB of them printed held the worker's GIL for two minutes)
_VALIDATION = re.compile(
    r"(?m)^(\S[^\n]{0,256})(\n  [^\n]*?\[type=[\w.-]+, input_value=)(.{0,128}?)(?=, input_type=\w+\]$)")
_registered: set[str] = set()  # secret values given in settings (an LM's api_key), not in the environment


def register(settings: Any) -> None:
    """Remember the values of secret-named settings (e.g. ``lm_kwargs={"api_key": ...}``) so that text
    quoting them (a provider's "Incorrect API key provided: sk-...") is masked too."""
    if isinstance(settings, Mapping):
        for key, value in settings.items():
            if isinstance(key, str) and is_secret_name(key) and isinstance(value, str) and len(value) >= 6:
                _registered.add(value)
            else:
                register(value)
    elif isinstance(settings, (list, tuple)):
        for value in settings:
            register(value)
    elif isinstance(settings, str):
        _registered.update(url_passwords(settings))


def url_passwords(value: str) -> set[str]:
    """The password of ``value`` if it is a URL with one (``https://user:p%40ss@host``), as written and decoded
    (``p%40ss`` and ``p@ss``: text may quote either), those of at least 6 characters; else none."""
    if "://" not in value:
        return set()
    try:
        raw = urllib.parse.urlsplit(value).password or ""
    except ValueError:  # not a URL after all (an invalid port, brackets)
        return set()
    return {password for password in (raw, urllib.parse.unquote(raw)) if len(password) >= 6}


def is_secret_name(name: str) -> bool:
    return bool(_SECRET_NAME.search(name))


def secret_values(env: Mapping[str, str] | None = None) -> list[str]:
    """The values of secret-named environment variables (longest first, so none hides part of another)."""
    env = os.environ if env is None else env
    found = {v for k, v in env.items() if is_secret_name(k) and len(v) >= 6} | _registered
    found |= {password for v in env.values() for password in url_passwords(v)}  # HTTPS_PROXY's
    return sorted(found, key=len, reverse=True)


def text(value: str, limit: int | None = MAX_MESSAGE) -> str:
    """``value`` with every secret masked (and, with ``limit``, shortened: what is cut is not searched, so a 50 MB
    message costs no more than a short one)."""
    cut = 0
    if limit is not None and len(value) > limit + SECRET_ROOM:
        cut, value = len(value) - limit - SECRET_ROOM, value[:limit + SECRET_ROOM]
    for secret in secret_values():
        value = value.replace(secret, MASK)
    value = _ASSIGNED.sub(_assigned, value)
    value = _BEARER.sub(lambda m: m.group(1) + MASK, value)
    value = _USERINFO.sub(lambda m: m.group(1) + MASK, value)
    if "input_value=" in value:
        value = _VALIDATION.sub(_validated, value)
    if limit is not None and len(value) > limit:
        value = value[:limit] + f"… ({len(value) - limit + cut} more characters)"
    return value


def _assigned(match: re.Match[str]) -> str:
    """An ``_ASSIGNED`` match with its value masked, or as it is: a quoted text of more than one word under a name
    that only holds a secret's word."""
    tail, quoted = match.group(2), match.group(4)
    if quoted is None or tail in ("", "s") or is_secret_name(tail) or re.fullmatch(_WORD, quoted):
        return match.group(1) + MASK
    return match.group(0)


def _validated(match: re.Match[str]) -> str:
    """A ``_VALIDATION`` match with the value masked where the field's name (its location's last part) is a
    secret's."""
    if not is_secret_name(match.group(1).rsplit(".", 1)[-1]):
        return match.group(0)
    return match.group(1) + match.group(2) + MASK


def mapping(value: Any) -> Any:
    """A JSON-like value with secret-named keys masked and secret values masked in every string."""
    if isinstance(value, Mapping):
        return {k: MASK if isinstance(k, str) and is_secret_name(k) else mapping(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [mapping(v) for v in value]
    if isinstance(value, str):
        return text(value, limit=None)
    return value


def shown(value: Any) -> str:
    """``repr(value)`` as an error may quote a setting it refuses: secret-named keys of a dict (or of one in a
    list) masked whole, secrets masked in the rest, and shortened."""
    return text(repr(mapping(value) if isinstance(value, (Mapping, list, tuple)) else value))
