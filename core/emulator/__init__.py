"""A Bitrix24 portal emulator that runs as real HTTP servers on loopback.

Used by this project's tests, by ``b24sms demo`` and by plugin authors who want to see a message
go through Bitrix24's side of the protocol without a real portal::

    from b24sms.emulator import Emulator

    with Emulator(client_id="local.test", client_secret="s3cret") as emu:
        portal = emu.add_portal()
        portal.install("http://127.0.0.1:8000")          # ONAPPINSTALL to the app
        message_id, response = portal.send_sms("provider1", "+19990000000", "Hi")
        portal.wait_for_status(message_id)              # until the app reports a final status

Modules: ``server`` (the emulator and its OAuth server), ``portal`` (one portal: REST methods,
state, the calls it makes to the app), ``events`` (``event.bind``/``get``/``unbind``: the
handlers app events go to), ``httpd`` (the loopback HTTP plumbing), ``php_lenient_form``
(PHP bracket form encoding). ``python -m b24sms.emulator`` runs one portal from the shell.
``users``: which user holds which token, for ``user.admin`` (``EmulatedPortal.user_auth``).
"""

from .httpd import RestError
from .php_lenient_form import php_form_decode, php_form_encode
from .portal import FINAL_STATUSES, MESSAGE_STATUSES, SCOPE, EmulatedPortal
from .server import Emulator

__all__ = [
    "FINAL_STATUSES",
    "MESSAGE_STATUSES",
    "SCOPE",
    "EmulatedPortal",
    "Emulator",
    "RestError",
    "php_form_decode",
    "php_form_encode",
]
