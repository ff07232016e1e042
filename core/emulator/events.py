"""The event handlers an app bound on one emulated portal: ``event.bind``, ``event.get``,
``event.unbind``, as bitrix24/b24restdocs describes them.

- ``api-reference/events/event-bind.md``: ``event`` and ``handler`` are required; an unknown
  event answers 400 ``ERROR_EVENT_NOT_FOUND`` "Event not found"; the result is ``true``. "When an
  application is deleted or updated, its actions will be removed. Therefore, they must be set
  from scratch in the installer of each version." The page says "actions"; on the page that
  documents event.bind we read it as the event handlers bound with it (an assumption).
- ``api-reference/events/event-get.md``: a list of ``{"event", "handler", "auth_type",
  "offline"}``, the app's own handlers only.
- ``api-reference/events/event-unbind.md``: ``event`` and ``handler`` narrow what is removed
  ("if no parameters are specified, all event handlers that meet the other requirements will be
  deleted"); the result is ``{"count": n}``.
- ``api-reference/events/index.md``: the handler URL must be reachable from outside; Bitrix24
  calls only handlers bound this way.

The docs do not say whether binding the same handler twice is refused; the emulator stores the
duplicate (and would deliver twice), the worse case for an app, so tests catch an app that binds
without looking at ``event.get`` first.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from .httpd import RestError

__all__ = ["KNOWN_EVENTS", "EventBindings"]

#: the events this emulator knows (the app events of api-reference/common/events/, and a few
#: CRM ones so that binding an ordinary event works too)
KNOWN_EVENTS = frozenset(
    {
        "ONAPPINSTALL",
        "ONAPPUNINSTALL",
        "ONAPPUPDATE",
        "ONAPPPAYMENT",
        "ONAPPTEST",
        "ONCRMLEADADD",
        "ONCRMDEALADD",
        "ONCRMCONTACTADD",
    }
)


def _lower_keys(params: Mapping[str, Any]) -> dict[str, Any]:
    # An assumption, not a documented rule: the event-bind.md / event-unbind.md examples write
    # the parameter names in lower case and event names in either case, and PHP-side REST
    # handlers read them case-insensitively; the emulator accepts both rather than refuse a call
    # a real portal might take.
    return {str(key).lower(): value for key, value in params.items() if key != "auth"}


class EventBindings:
    """The handlers bound on one portal, in binding order (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bound: list[dict[str, Any]] = []

    def bind(self, params: Mapping[str, Any]) -> bool:
        """``event.bind``."""
        params = _lower_keys(params)
        event = str(params.get("event") or "").strip().upper()
        if event not in KNOWN_EVENTS:
            raise RestError("ERROR_EVENT_NOT_FOUND", "Event not found", 400)
        handler = params.get("handler")
        if not isinstance(handler, str) or not handler.strip():
            # The docs list no code for a missing handler; Bitrix24's event handler checks answer
            # like its other handler URL checks (bizproc-activity-add.md).
            raise RestError("ERROR_WRONG_HANDLER_URL", "Wrong handler URL", 400)
        offline = str(params.get("event_type") or "online").lower() == "offline"
        with self._lock:
            self._bound.append(
                {
                    "event": event,
                    "handler": handler.strip(),
                    "auth_type": str(params.get("auth_type") or "0"),
                    "offline": 1 if offline else 0,
                }
            )
        return True

    def get(self, params: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        """``event.get``: copies of the bindings."""
        with self._lock:
            return [dict(binding) for binding in self._bound]

    def unbind(self, params: Mapping[str, Any]) -> dict[str, int]:
        """``event.unbind``: every binding matching the given ``event`` and ``handler``."""
        params = _lower_keys(params)
        event = str(params.get("event") or "").strip().upper()
        handler = str(params.get("handler") or "").strip()
        with self._lock:
            keep = [
                b
                for b in self._bound
                if (event and b["event"] != event) or (handler and b["handler"] != handler)
            ]
            count = len(self._bound) - len(keep)
            self._bound = keep
        return {"count": count}

    def handlers(self, event: str) -> list[str]:
        """The URLs an ``event`` goes to, one per binding (duplicates included)."""
        with self._lock:
            return [b["handler"] for b in self._bound if b["event"] == event.upper()]

    def clear(self) -> None:
        """Drop every binding: the app was removed or updated (event-bind.md)."""
        with self._lock:
            self._bound.clear()
