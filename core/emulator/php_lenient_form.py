"""PHP-style bracketed form fields, the way Bitrix24 writes and reads them.

Bitrix24 is PHP: it sends nested data as ``auth[member_id]=…&bindings[0][OWNER_ID]=…`` and parses
incoming forms (``NAME[en]=…``, ``cmd[k]=…``) with PHP's rules. Both directions live here so the
emulator's REST side and its outgoing calls agree with each other.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from ..php_form import php_form_encode

__all__ = ["php_form_decode", "php_form_encode"]

# Encoding is shared with the REST client (b24sms.php_form); decoding here is PHP-lenient on
# purpose.

_SEGMENT = re.compile(r"\[([^\]]*)\]")


def _split_key(key: str) -> list[str] | None:
    """``a[b][]`` -> ``["a", "b", ""]``; a key PHP would not nest stays whole."""
    open_at = key.find("[")
    if open_at <= 0:
        return [key] if key else None
    if "]" not in key[open_at:]:
        # PHP reads a name whose first bracket never closes as a plain name, "[" turned "_".
        return [key[:open_at] + "_" + key[open_at + 1 :]]
    parts = [key[:open_at]]
    pos = open_at
    while pos < len(key):
        match = _SEGMENT.match(key, pos)
        if match is None:
            # PHP drops whatever follows a later unbalanced bracket rather than failing.
            break
        parts.append(match.group(1))
        pos = match.end()
    return parts


def _next_index(container: dict[str, Any]) -> str:
    numeric = [int(k) for k in container if k.isdigit()]
    return str(max(numeric) + 1 if numeric else 0)


def php_form_decode(pairs: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """Turn decoded form pairs into nested dicts the way PHP fills ``$_POST``.

    ``[("NAME[en]", "x"), ("a[]", "1"), ("a[]", "2")]`` gives
    ``{"NAME": {"en": "x"}, "a": {"0": "1", "1": "2"}}``. Every container is a dict with string
    keys (PHP arrays are ordered maps); a later scalar for the same key wins, as in PHP.

    :param pairs: ``(key, value)`` pairs, e.g. from :func:`urllib.parse.parse_qsl`.
    :returns: the nested parameters.
    """
    result: dict[str, Any] = {}
    for key, value in pairs:
        parts = _split_key(key)
        if not parts:
            continue
        node = result
        for depth, part in enumerate(parts):
            name = _next_index(node) if part == "" and depth else part
            if depth == len(parts) - 1:
                node[name] = value
            else:
                child = node.get(name)
                if not isinstance(child, dict):
                    child = {}
                    node[name] = child
                node = child
    return result
