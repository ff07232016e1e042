"""PHP-style bracketed form encoding, as PHP's ``http_build_query`` writes it.

Bitrix24 is PHP: nested parameters travel as ``NAME[en]=…&cmd[k]=…``. The REST client encodes
``batch`` commands with it and the portal emulator its outgoing calls. (Reading such forms is
done strictly by :func:`b24sms.bitrix24.payloads.parse_bracketed` on our side, and
PHP-leniently by the emulator.)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import urlencode

__all__ = ["php_form_encode", "php_urlencode"]


def _flatten(prefix: str, value: Any, out: list[tuple[str, str]]) -> None:
    if value is None:
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            _flatten(f"{prefix}[{key}]" if prefix else str(key), item, out)
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _flatten(f"{prefix}[{index}]", item, out)
    elif isinstance(value, bool):
        # http_build_query writes booleans as 1/0.
        out.append((prefix, "1" if value else "0"))
    else:
        out.append((prefix, str(value)))


def php_form_encode(data: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Flatten nested data into bracketed form pairs, like PHP's ``http_build_query``.

    ``{"auth": {"member_id": "m"}, "bindings": [{"OWNER_ID": 5}]}`` gives
    ``[("auth[member_id]", "m"), ("bindings[0][OWNER_ID]", "5")]``. ``None`` values are left out.

    :param data: the nested parameters.
    :returns: pairs ready for ``requests.post(url, data=pairs)`` or :func:`urllib.parse.urlencode`.
    """
    out: list[tuple[str, str]] = []
    _flatten("", data, out)
    return out


def php_urlencode(params: Mapping[str, Any]) -> str:
    """:func:`php_form_encode` as a query string (brackets percent-encoded; PHP reads them the
    same), e.g. for ``batch`` commands."""
    return urlencode(php_form_encode(params))
