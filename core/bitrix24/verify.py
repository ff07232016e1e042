"""Proving that an access token someone shows us is alive at a portal we know.

Used where a caller cannot be checked by ``application_token``: a re-install that brings a new
one, and (later) the app page that Bitrix24 opens in a frame with the user's ``AUTH_ID``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import requests

from .. import __version__

log = logging.getLogger(__name__)


def probe_token(client_endpoint: str, access_token: str, settings: Mapping[str, Any]) -> bool:
    """True when ``app.info`` answers with a result for this token at this portal."""
    if not access_token:
        return False
    try:
        response = requests.post(
            client_endpoint.rstrip("/") + "/app.info",
            json={"auth": access_token},
            headers={"User-Agent": settings.get("user_agent") or f"b24sms/{__version__}"},
            timeout=(5, float(settings.get("timeout", 30))),
        )
        body = response.json()
    except (requests.RequestException, ValueError) as exc:
        log.warning("token probe at %s failed: %s", _host(client_endpoint), type(exc).__name__)
        return False
    return response.status_code == 200 and isinstance(body, dict) and "result" in body


def _host(url: str) -> str:
    from urllib.parse import urlsplit

    return urlsplit(url).netloc
