"""Following a moved portal: a renamed Bitrix24 answers REST calls at its old address with a
redirect to the new one (settings/how-to-call-rest-api/change-domen.md). ``requests`` would turn
a redirected POST into a GET without its body, and Bitrix24 then answers ``NO_AUTH_FOUND``; the
docs' advice is to disable redirects and send the same POST again to the new address.

Only portal REST calls come here, never the OAuth exchange: a redirect must not carry a client
secret or a refresh token anywhere.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import requests

__all__ = ["MAX_HOPS", "REDIRECT_STATUSES", "Moved", "TooManyRedirects", "follow_redirects"]

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
#: a portal renamed twice in a row is the worst honest case; more hops are a loop
MAX_HOPS = 3


class TooManyRedirects(Exception):
    """The portal kept redirecting, or to somewhere we do not send tokens."""


@dataclass
class Moved:
    """Where a portal's REST endpoint now is."""

    client_endpoint: str
    domain: str


def _target(url: str, response: requests.Response) -> str:
    location = response.headers.get("Location")
    if not location:
        raise TooManyRedirects(f"HTTP {response.status_code} without a Location")
    target = urljoin(url, location)
    old, new = urlsplit(url), urlsplit(target)
    if new.scheme not in ("http", "https") or not new.hostname:
        raise TooManyRedirects(f"redirect to an unsupported address ({new.scheme or '?'})")
    if old.scheme == "https" and new.scheme != "https":
        # The access token travels with the request: never from TLS to plain text.
        raise TooManyRedirects("redirect from https to http refused")
    if new.path != old.path:
        # A renamed portal answers the same REST path on its new host (change-domen.md); a
        # redirect anywhere else is not a move, and our token does not follow it there.
        raise TooManyRedirects(f"redirect to another path ({new.path or '/'}) refused")
    if not _is_global(new.hostname) and _is_global(old.hostname):
        # A public portal must not steer us into our own network (loopback, private ranges,
        # the cloud's metadata address), whatever spelling of the address it uses. (requests
        # resolves the name again when it connects: a name re-pointed in between is not caught.)
        raise TooManyRedirects("redirect from a public address to a private one refused")
    return target


def _is_global(host: str | None) -> bool:
    """Whether every address ``host`` resolves to is global (not loopback, private, link-local
    or reserved); False for ``localhost`` names and for a host that does not resolve.

    Resolved, not parsed: ``127.1``, ``2130706433`` and ``0x7f000001`` are no IP literals to
    :mod:`ipaddress`, but the resolver (and so requests) takes them for 127.0.0.1.
    """
    if not host or host.lower() == "localhost" or host.lower().endswith(".localhost"):
        return False
    try:
        infos = socket.getaddrinfo(host.strip("[]"), None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return False
    addresses = {str(info[4][0]).split("%", 1)[0] for info in infos}  # IPv6: no "%scope"
    return bool(addresses) and all(ipaddress.ip_address(a).is_global for a in addresses)


def follow_redirects(
    url: str, response: requests.Response, send: Callable[[str], requests.Response]
) -> tuple[requests.Response, str]:
    """Send the same request again to where ``response`` points, up to :data:`MAX_HOPS` times.

    :param url: the URL that answered ``response``.
    :param response: the answer; returned as is when it is no redirect.
    :param send: sends the original request (same method, same body) to a URL.
    :returns: the first answer that is no redirect, and the URL that gave it.
    :raises TooManyRedirects: more hops than allowed, or a target that is not http(s), or a
        downgrade from https to http.
    """
    hops = 0
    while response.status_code in REDIRECT_STATUSES:
        if hops >= MAX_HOPS:
            raise TooManyRedirects(f"more than {MAX_HOPS} redirects")
        url = _target(url, response)
        response.close()
        response = send(url)
        hops += 1
    return response, url


def moved_endpoint(old_endpoint: str, method: str, final_url: str) -> Moved | None:
    """The new ``client_endpoint`` and domain when a call of ``method`` ended at ``final_url``
    instead of ``old_endpoint + method``; None when it did not move."""
    old = old_endpoint if old_endpoint.endswith("/") else old_endpoint + "/"
    if final_url.split("?", 1)[0] == old + method:
        return None
    parts = urlsplit(final_url)
    path = parts.path
    endpoint_path = path[: -len(method)] if path.endswith("/" + method) else "/rest/"
    endpoint = f"{parts.scheme}://{parts.netloc}{endpoint_path}"
    return Moved(client_endpoint=endpoint, domain=parts.netloc)
