"""A fake Twilio REST API on 127.0.0.1, spoken to by the real ``twilio`` library.

Point the ``twilio`` gateway at it with ``api_base_url = fake.url``::

    with FakeTwilio() as fake:                       # or fake = FakeTwilio().start(); fake.stop()
        options = {"account_sid": fake.account_sid, "auth_token": fake.auth_token,
                   "from": "+15005550006", "api_base_url": fake.url}

Endpoints (HTTP basic auth with ``account_sid``/``auth_token``; otherwise 401, code 20003):

- ``POST /2010-04-01/Accounts/{sid}/Messages.json`` — creates a message: form ``To``, ``Body``,
  ``From`` or ``MessagingServiceSid``, ``StatusCallback``; answers 201 with Twilio's JSON
  (``sid`` ``SM…``, ``status`` = ``fake.initial_status``, default ``queued``);
- ``GET /2010-04-01/Accounts/{sid}/Messages/{MessageSid}.json`` — the message, 404 (20404)
  when unknown.

State: ``fake.messages`` (sid → dict with ``sid``, ``to``, ``from``, ``body``, ``status``,
``status_callback``, ``messaging_service_sid``, ``error_code``) and ``fake.requests`` (every
:class:`~tests.fakes.http_gateway.RecordedRequest`).

Scripting:

- Twilio's magic test numbers fail as they do with test credentials: ``+15005550001`` → 400/21211
  (invalid To), ``+15005550004`` → 400/21610 (unsubscribed), ``+15005550009`` → 400/21614 (not a
  mobile); add more with ``fake.fail_to[number] = (http_status, code, message)``;
- ``fake.inject(http_status, code, message, times=1, retry_after=None)`` — the next ``times``
  creates fail so (``inject(429, 20429, "Too Many Requests", retry_after="3")``,
  ``inject(500, 20500, "Internal")``);
- ``fake.delay = 2.0`` — answers wait that long (client timeouts);
- ``fake.set_status(sid, "delivered", error_code=None)`` — what a later GET answers.

Status callbacks, signed exactly as Twilio signs them (``RequestValidator.compute_signature``):

- ``fake.callback(sid, "delivered", error_code=None)`` — sets the status and POSTs the form
  (``MessageSid``, ``MessageStatus``, ``AccountSid``, ``From``, ``To``, ``ErrorCode``…) to the
  message's ``StatusCallback``; returns the :class:`requests.Response`;
- ``fake.auto_callbacks = ("sent", "delivered")`` — after each create, a background thread posts
  these in order, ``fake.callback_delay`` seconds apart (default 0.2; the first one too);
  responses land in ``fake.callback_responses``; ``fake.wait_callbacks(n)`` waits for them;
- module function ``send_status_callback(url, params, auth_token, signature=None)`` posts any
  form, signed with ``auth_token`` (or with the given ``signature``), to any URL.
"""

from __future__ import annotations

import base64
import datetime as dt
import itertools
import secrets
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from email.utils import format_datetime
from typing import Any

import requests
from twilio.request_validator import RequestValidator

from .http_gateway import Answer, FakeServer, RecordedRequest

__all__ = ["FakeTwilio", "send_status_callback", "sign_callback"]

DEFAULT_ACCOUNT_SID = "AC" + "0123456789abcdef" * 2
DEFAULT_AUTH_TOKEN = "fake-twilio-auth-token-0123456789"

MAGIC_FAILURES: dict[str, tuple[int, int, str]] = {
    "+15005550001": (400, 21211, "The 'To' number +15005550001 is not a valid phone number."),
    "+15005550004": (400, 21610, "Attempt to send to unsubscribed recipient"),
    "+15005550009": (400, 21614, "'To' number is not a valid mobile number"),
}


def sign_callback(url: str, params: Mapping[str, str], auth_token: str) -> str:
    """The ``X-Twilio-Signature`` Twilio would send for this form posted to ``url``."""
    return RequestValidator(auth_token).compute_signature(url, dict(params))


def send_status_callback(
    url: str,
    params: Mapping[str, str],
    auth_token: str,
    *,
    signature: str | None = None,
    timeout: float = 10,
) -> requests.Response:
    """POST ``params`` as a form to ``url`` with Twilio's signature (or the one given)."""
    signature = signature if signature is not None else sign_callback(url, params, auth_token)
    return requests.post(
        url,
        data=dict(params),
        headers={"X-Twilio-Signature": signature, "User-Agent": "TwilioProxy/1.1"},
        timeout=timeout,
    )


@dataclass
class _Injected:
    status: int
    code: int
    message: str
    times: int
    retry_after: str | None


class FakeTwilio(FakeServer):
    """The fake Twilio API (see the module docstring)."""

    def __init__(
        self,
        account_sid: str = DEFAULT_ACCOUNT_SID,
        auth_token: str = DEFAULT_AUTH_TOKEN,
        *,
        initial_status: str = "queued",
        auto_callbacks: tuple[str, ...] = (),
    ) -> None:
        super().__init__()
        self.account_sid = account_sid
        self.auth_token = auth_token
        self.initial_status = initial_status
        self.auto_callbacks = auto_callbacks
        self.delay = 0.0
        #: seconds between the create answer and the first automatic callback, and between those
        self.callback_delay = 0.2
        self.messages: dict[str, dict[str, Any]] = {}
        self.fail_to: dict[str, tuple[int, int, str]] = dict(MAGIC_FAILURES)
        self.callback_responses: list[requests.Response] = []
        self._injected: list[_Injected] = []
        self._counter = itertools.count(1)
        self._callbacks_done = threading.Condition()

    # scripting -------------------------------------------------------------------------------

    def inject(
        self,
        status: int,
        code: int,
        message: str = "scripted error",
        *,
        times: int = 1,
        retry_after: str | None = None,
    ) -> None:
        """The next ``times`` creates fail with this HTTP status and Twilio error code."""
        with self.lock:
            self._injected.append(_Injected(status, code, message, times, retry_after))

    def set_status(self, sid: str, status: str, error_code: int | None = None) -> None:
        with self.lock:
            self.messages[sid]["status"] = status
            self.messages[sid]["error_code"] = error_code

    def callback(
        self, sid: str, status: str, error_code: int | None = None, *, signature: str | None = None
    ) -> requests.Response:
        """Set ``status`` and post the signed status callback to the message's StatusCallback."""
        self.set_status(sid, status, error_code)
        message = self.messages[sid]
        if not message["status_callback"]:
            raise AssertionError(f"message {sid} was created without StatusCallback")
        params = {
            "AccountSid": self.account_sid,
            "ApiVersion": "2010-04-01",
            "MessageSid": sid,
            "SmsSid": sid,
            "MessageStatus": status,
            "SmsStatus": status,
            "To": message["to"],
            "From": message["from"] or "+15005550006",
        }
        if message["messaging_service_sid"]:
            params["MessagingServiceSid"] = message["messaging_service_sid"]
        if error_code is not None:
            params["ErrorCode"] = str(error_code)
        return send_status_callback(
            message["status_callback"], params, self.auth_token, signature=signature
        )

    def wait_callbacks(self, count: int, timeout: float = 10) -> list[requests.Response]:
        """Wait until ``count`` automatic callbacks were answered."""
        with self._callbacks_done:
            self._callbacks_done.wait_for(lambda: len(self.callback_responses) >= count, timeout)
        return list(self.callback_responses)

    # the API ---------------------------------------------------------------------------------

    def _error(self, status: int, code: int, message: str, **headers: str) -> Answer:
        return self.json_answer(
            status,
            {
                "code": code,
                "message": message,
                "more_info": f"https://www.twilio.com/docs/errors/{code}",
                "status": status,
            },
            **headers,
        )

    def _authorized(self, request: RecordedRequest) -> bool:
        auth = request.header("Authorization") or ""
        if not auth.startswith("Basic "):
            return False
        try:
            user, _, password = base64.b64decode(auth[6:]).decode().partition(":")
        except ValueError:
            return False
        return user == self.account_sid and secrets.compare_digest(password, self.auth_token)

    def _resource(self, message: dict[str, Any]) -> dict[str, Any]:
        sid = message["sid"]
        return {
            "account_sid": self.account_sid,
            "api_version": "2010-04-01",
            "body": message["body"],
            "date_created": message["date_created"],
            "date_sent": None,
            "date_updated": message["date_created"],
            "direction": "outbound-api",
            "error_code": message["error_code"],
            "error_message": None,
            "from": message["from"],
            "messaging_service_sid": message["messaging_service_sid"],
            "num_media": "0",
            "num_segments": "1",
            "price": None,
            "price_unit": "USD",
            "sid": sid,
            "status": message["status"],
            "subresource_uris": {
                "media": f"/2010-04-01/Accounts/{self.account_sid}/Messages/{sid}/Media.json"
            },
            "to": message["to"],
            "uri": f"/2010-04-01/Accounts/{self.account_sid}/Messages/{sid}.json",
        }

    def handle(self, request: RecordedRequest) -> Answer:
        if self.delay:
            time.sleep(self.delay)
        prefix = f"/2010-04-01/Accounts/{self.account_sid}/Messages"
        if not self._authorized(request) or not request.path.startswith(prefix):
            return self._error(401, 20003, "Authenticate")
        if request.method == "POST" and request.path == prefix + ".json":
            return self._create(request.form)
        if request.method == "GET" and request.path.endswith(".json"):
            sid = request.path[len(prefix) + 1 : -len(".json")]
            with self.lock:
                message = self.messages.get(sid)
            if message is None:
                return self._error(
                    404, 20404, f"The requested resource {request.path} was not found"
                )
            return self.json_answer(200, self._resource(message))
        return self._error(405, 20004, "Method not allowed")

    def _create(self, form: dict[str, str]) -> Answer:
        with self.lock:
            while self._injected and self._injected[0].times <= 0:
                self._injected.pop(0)
            injected = self._injected[0] if self._injected else None
            if injected is not None:
                injected.times -= 1
        if injected is not None:
            headers = {"Retry-After": injected.retry_after} if injected.retry_after else {}
            return self._error(injected.status, injected.code, injected.message, **headers)
        to = form.get("To")
        if not to:
            return self._error(400, 21604, "A 'To' phone number is required.")
        if not form.get("Body"):
            return self._error(400, 21602, "Message body is required.")
        if not form.get("From") and not form.get("MessagingServiceSid"):
            return self._error(400, 21603, "A 'From' phone number is required.")
        if to in self.fail_to:
            status, code, message = self.fail_to[to]
            return self._error(status, code, message)
        sid = f"SM{next(self._counter):032x}"
        message = {
            "sid": sid,
            "to": to,
            "from": form.get("From"),
            "body": form["Body"],
            "messaging_service_sid": form.get("MessagingServiceSid"),
            "status_callback": form.get("StatusCallback"),
            "status": self.initial_status,
            "error_code": None,
            "date_created": format_datetime(dt.datetime.now(dt.UTC), usegmt=True),
        }
        with self.lock:
            self.messages[sid] = message
        if self.auto_callbacks and message["status_callback"]:
            threading.Thread(target=self._run_auto_callbacks, args=(sid,), daemon=True).start()
        return self.json_answer(201, self._resource(message))

    def _run_auto_callbacks(self, sid: str) -> None:
        for status in self.auto_callbacks:
            time.sleep(self.callback_delay)  # let the create answer reach the client first
            try:
                response = self.callback(sid, status)
            except requests.RequestException:
                break
            with self._callbacks_done:
                self.callback_responses.append(response)
                self._callbacks_done.notify_all()
