"""HANDLER keys: what proves a HANDLER call was sent to a URL we issued for one portal and CODE.

Bitrix24 leaves ``auth[…]`` out of some HANDLER calls, so each provider's HANDLER URL carries
``member_id`` and a key: a hex HMAC-SHA256 of ``"{member_id}:{code}"`` under the service's
``secret_key``. Provider sync signs the URL (:func:`handler_url`); the HANDLER route checks the
key (:func:`check_key`) before anything else, and hands the verdict to the rate limit.

During a ``secret_key`` rotation the keys of ``previous_secret_keys`` are accepted too, and
logged, until ``b24sms providers sync`` has registered new URLs (see docs/operations.md).

One portal's keys are rotated on their own by a *key version* stored on the portal
(``b24sms portals rotate-key MEMBER_ID``): version N > 0 signs ``"{member_id}:{code}:{N}"`` and
its URL carries ``kv=N``; version 0 is the original key, without ``kv``. The route proves the
signature here (no database needed); storage then accepts only versions from the portal's
``handler_key_oldest`` to ``handler_key_version``, and a successful provider sync retires the
older ones.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Sequence

from .config import ServiceConfig

__all__ = [
    "HANDLER_KEY_LENGTH",
    "check_key",
    "handler_key",
    "handler_key_generation",
    "handler_secret_keys",
    "handler_url",
    "key_accepted",
    "key_version",
    "verify_handler_key",
]

log = logging.getLogger(__name__)

HANDLER_KEY_LENGTH = 32


#: key versions a URL may name at most (``kv=``); a portal rotated more often is not expected
MAX_KEY_VERSION = 1_000_000


def handler_key(secret_key: str, member_id: str, code: str, version: int = 0) -> str:
    """The key in a HANDLER URL: hex HMAC-SHA256 of ``"{member_id}:{code}"`` (version 0) or
    ``"{member_id}:{code}:{version}"``, 32 characters."""
    signed = f"{member_id}:{code}" + (f":{version}" if version else "")
    digest = hmac.new(secret_key.encode(), signed.encode(), hashlib.sha256)
    return digest.hexdigest()[:HANDLER_KEY_LENGTH]


def handler_url(
    public_url: str, secret_key: str, member_id: str, code: str, version: int = 0
) -> str:
    """The HANDLER URL registered for ``code`` on the portal ``member_id``."""
    key = handler_key(secret_key, member_id, code, version)
    # member_id travels in the URL because Bitrix24 leaves auth[...] out of some handler calls,
    # and the key proves the URL was issued by us for this very portal and CODE.
    url = f"{public_url}/bitrix24/handler/{code}?member_id={member_id}&key={key}"
    return url + (f"&kv={version}" if version else "")


def key_version(text: str | None) -> int | None:
    """The key version a URL names (``kv``; absent: 0), or None when it names none we issue."""
    if text is None:
        return 0
    if not (text.isascii() and text.isdigit()) or len(text) > 7:
        return None
    version = int(text)
    return version if 0 < version <= MAX_KEY_VERSION else None


def handler_secret_keys(settings: ServiceConfig) -> tuple[str, ...]:
    """The keys HANDLER URLs are checked against: ``secret_key`` first, then the
    ``previous_secret_keys`` of a rotation in progress (see docs/operations.md)."""
    return (settings.secret_key, *settings.previous_secret_keys)


def handler_key_generation(
    secret_keys: str | Sequence[str],
    member_id: str,
    code: str,
    key: str | None,
    version: int = 0,
) -> int | None:
    """Which of ``secret_keys`` issued ``key`` for this portal and CODE: 0 for the current one,
    1… for previous ones, None for none. Every candidate is compared, in constant time each."""
    if not key:
        return None
    # Compared as bytes: compare_digest refuses str with non-ASCII characters (a TypeError, a
    # 500), and a key anybody can type must only ever be "not valid".
    given = str(key).encode("utf-8", "surrogatepass")
    candidates = (secret_keys,) if isinstance(secret_keys, str) else tuple(secret_keys)
    found = None
    for index, secret_key in enumerate(candidates):
        expected = handler_key(secret_key, member_id, code, version).encode()
        if hmac.compare_digest(expected, given):
            found = index if found is None else found
    return found


def key_accepted(generation: int | None, member_id: str, code: str) -> bool:
    """Whether a key of this :func:`handler_key_generation` is accepted; one of a previous
    secret key is, and logged: that portal's HANDLER URL is still the old one until
    ``b24sms providers sync`` updates it."""
    if generation is not None and generation > 0:
        log.info(
            "HANDLER call of portal %s (code %s) used a key of a previous secret_key; "
            "run `b24sms providers sync` before dropping it from previous_secret_keys",
            member_id,
            code,
        )
    return generation is not None


def verify_handler_key(
    secret_keys: str | Sequence[str],
    member_id: str,
    code: str,
    key: str | None,
    version: int = 0,
) -> bool:
    """Whether ``key`` is the HANDLER key of this portal, CODE and key version under the current
    secret key or one of the previous ones (``secret_keys``: one key, or current then previous).

    Whether the portal still accepts that key version is for storage to say (it has the row).
    """
    generation = handler_key_generation(secret_keys, member_id, code, key, version)
    return key_accepted(generation, member_id, code)


def check_key(
    settings: ServiceConfig,
    member_id: str,
    code: str,
    key: str | None,
    version: int | None = 0,
) -> bool:
    """The HANDLER route's verdict on a call's key, under the ``[service]`` settings.

    :param version: the key version the URL names (:func:`key_version`; None: an invalid one).
    """
    if not member_id or version is None:
        return False
    return verify_handler_key(handler_secret_keys(settings), member_id, code, key, version)
