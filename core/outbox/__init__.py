"""Each portal's outbox of statuses for Bitrix24, flushed in coalesced, paced batches.

By concern: :mod:`.flush` (the rounds of a flush, batching), :mod:`.lease` (one flusher per
portal), :mod:`.pacing` (the token bucket, and whether the portal may be called now) and
:mod:`.policy` (what failed requests and refused commands do).
"""

from __future__ import annotations

from .flush import BATCH_SIZE, STATUS_UPDATE, FlushReport, flush_portal, outbox_backlog

__all__ = ["BATCH_SIZE", "STATUS_UPDATE", "FlushReport", "flush_portal", "outbox_backlog"]
