"""The outbox's pacing on its own: the shared token bucket and the one "may we call now"."""

from __future__ import annotations

import datetime as dt

from b24sms.models import Portal, PortalPacing
from b24sms.outbox.pacing import take_token, wait_before_calling

NOW = dt.datetime(2026, 1, 1, 12, 0, 0)


def test_the_bucket_lets_a_burst_through_then_paces_at_the_rate():
    state = PortalPacing(portal_id=1, bucket_level=0.0, failures=0)
    assert [take_token(state, NOW, 2.0, 3.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert take_token(state, NOW, 2.0, 3.0) == 0.5  # one request drains in 1/rate seconds
    later = NOW + dt.timedelta(seconds=0.5)
    assert take_token(state, later, 2.0, 3.0) == 0.0


def test_a_paused_portal_waits_until_the_pause_ends():
    portal = Portal(paused_until=NOW + dt.timedelta(seconds=90))
    assert wait_before_calling(portal, NOW) == 90.0
    assert wait_before_calling(portal, NOW + dt.timedelta(seconds=91)) == 0.0
    assert wait_before_calling(Portal(paused_until=None), NOW) == 0.0
