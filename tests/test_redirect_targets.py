"""A redirect from a public portal into our own network is refused, however the address is
spelled: the resolver (and so requests) reads ``127.1``, ``2130706433`` or ``0x7f000001`` as
127.0.0.1 and ``2852039166`` as 169.254.169.254, the cloud metadata address.

A public origin cannot be served on loopback, so these call :func:`follow_redirects` with the
answer such a portal would give and a ``send`` that records where it would go next.
"""

from __future__ import annotations

import io

import pytest
import requests

from b24sms.bitrix24.redirects import TooManyRedirects, follow_redirects

PUBLIC_ORIGIN = "https://93.184.216.34/rest/profile"  # a global address, never connected to


def redirect(location: str, status: int = 302) -> requests.Response:
    response = requests.Response()
    response.status_code = status
    response.headers["Location"] = location
    response.raw = io.BytesIO(b"")  # an empty body, closed after the hop
    return response


def ok() -> requests.Response:
    response = requests.Response()
    response.status_code = 200
    return response


@pytest.mark.parametrize(
    "host",
    [
        "2130706433",
        "127.1",
        "0x7f000001",
        "2852039166",
        "0177.0.0.1",
        "10.1",
        "[::ffff:127.0.0.1]",
        "[::1]",
        "localhost",
        "no-such-host.invalid",
    ],
)
def test_a_public_portal_cannot_redirect_into_our_network(host):
    sent: list[str] = []
    with pytest.raises(TooManyRedirects, match="public address to a private one"):
        follow_redirects(
            PUBLIC_ORIGIN,
            redirect(f"https://{host}/rest/profile", 307),
            lambda url: sent.append(url) or ok(),
        )
    assert sent == []


def test_a_public_portal_may_move_to_another_public_address():
    sent: list[str] = []
    response, final = follow_redirects(
        PUBLIC_ORIGIN,
        redirect("https://93.184.216.35/rest/profile", 301),
        lambda url: sent.append(url) or ok(),
    )
    assert response.status_code == 200
    assert sent == [final] == ["https://93.184.216.35/rest/profile"]


def test_a_private_portal_may_move_within_its_network():
    # Self-hosted portals on a private network (and the emulator on loopback) keep working.
    sent: list[str] = []
    follow_redirects(
        "http://10.0.0.5/rest/profile",
        redirect("http://2130706433/rest/profile"),
        lambda url: sent.append(url) or ok(),
    )
    assert sent == ["http://2130706433/rest/profile"]
