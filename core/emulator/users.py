"""The users of one emulated portal, and which of them holds which token.

Every user who opens an app gets a token pair of their own (b24restdocs
``sdk/bx24-js-sdk/system-functions/bx24-get-auth.md``), valid for REST calls of the app like the
installing administrator's. What tells them apart is who they are: ``user.admin`` "determines
whether the current user has the permissions to manage application settings" and answers
``true`` or ``false`` (``api-reference/common/users/user-admin.md``; any user may call it).
User 1 is the administrator who installed the app; tokens nobody claimed are theirs.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass

__all__ = ["INSTALLER", "PortalUser", "PortalUsers"]


@dataclass(frozen=True)
class PortalUser:
    """One user of the portal."""

    id: int
    admin: bool


#: the administrator who installed the app (``auth[user_id]`` of the install events)
INSTALLER = PortalUser(1, True)


class PortalUsers:
    """Who holds which access or refresh token (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ids = itertools.count(INSTALLER.id + 1)
        self._owners: dict[str, PortalUser] = {}

    def add(self, admin: bool) -> PortalUser:
        """A new user, an administrator or not."""
        with self._lock:
            return PortalUser(next(self._ids), admin)

    def assign(self, user: PortalUser, *tokens: str) -> None:
        """Record ``tokens`` as ``user``'s."""
        with self._lock:
            self._owners.update(dict.fromkeys(tokens, user))

    def owner(self, token: object) -> PortalUser:
        """The user holding ``token`` (the installer when nobody else was given it)."""
        with self._lock:
            return self._owners.get(token, INSTALLER) if isinstance(token, str) else INSTALLER
