"""Helpers the test modules share: a gateway whose answers a test scripts, an event recorder,
a service on a fresh SQLite database, rows (portals, messages) put in directly, the ``b24sms``
command run as a process, the app page opened the way Bitrix24's frame opens it, and a log
handler that keeps every record.

Test modules import these from here rather than from one another, so that each test module
can change without breaking another.
"""

from __future__ import annotations

import logging
import os
import secrets
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import requests
from sqlalchemy import select

from b24sms import hookimpl, logs
from b24sms.config import prepare_instance, validate_config
from b24sms.gateway import (
    Gateway,
    OutgoingMessage,
    SendResult,
    StatusReport,
)
from b24sms.models import (
    Message,
    OutboxEntry,
    Portal,
    PortalState,
    StatusEvent,
    utcnow,
)
from b24sms.plugins import make_plugin_manager
from b24sms.schema import upgrade
from b24sms.service import Service
from b24sms.testing.service import CLIENT_ID, CLIENT_SECRET, SECRET_KEY
from b24sms.testing.service import service_config as base_config

CODE = "scripted"
REPO = Path(__file__).resolve().parent.parent


# -- a gateway whose answers a test scripts ------------------------------------------------------


class ScriptedGateway(Gateway):
    """Answers ``send`` from ``script`` (exceptions are raised, callables called), else accepts
    the message and reports it delivered at once."""

    name: ClassVar[str] = "scripted"
    statuses: ClassVar[dict[str, str]] = {
        "accepted": "sent",
        "queued": "queued",
        "DELIVRD": "delivered",
        "UNDELIV": "undelivered",
        "REJECTD": "failed",
    }
    callbacks: ClassVar[bool] = True

    def __init__(self, options: Any, context: Any) -> None:
        super().__init__(options, context)
        self.script: list[Any] = []
        self.calls: list[OutgoingMessage] = []

    def send(self, message: OutgoingMessage) -> SendResult:
        self.calls.append(message)
        step = self.script.pop(0) if self.script else None
        if isinstance(step, BaseException):
            raise step
        if callable(step):
            return step(message)
        if step is not None:
            return step
        return SendResult(
            external_id=f"ext-{message.id}",
            raw_status="accepted",
            later=(StatusReport("DELIVRD"),),
        )


class ScriptedPlugin:
    @hookimpl
    def b24sms_register_gateways(self, register: Callable[[type[Gateway]], None]) -> None:
        register(ScriptedGateway)


class Recorder:
    """Collects the event hooks' calls."""

    def __init__(self) -> None:
        self.changes: list[tuple[int, str | None, str, str]] = []
        self.failures: list[tuple[int, str, bool, int]] = []

    @hookimpl
    def b24sms_status_changed(self, message, previous, status, raw_status, source) -> None:
        assert message.status == status
        self.changes.append((message.id, previous, status, source))

    @hookimpl
    def b24sms_send_failed(self, message, error, will_retry) -> None:
        self.failures.append((message.id, str(error), will_retry, message.attempts))


# -- service and rows ----------------------------------------------------------------------------


def build_service(
    tmp_path,
    *,
    service: dict[str, Any] | None = None,
    bitrix24: dict[str, Any] | None = None,
    recorder: Recorder | None = None,
    providers: dict[str, Any] | None = None,
) -> Service:
    """A Service on a fresh SQLite database in ``tmp_path`` with the scripted gateway as CODE
    ``scripted``; tiny retry delays unless ``service`` says otherwise."""
    settings = {
        "queue_url": "memory://",
        "max_attempts": 5,
        "retry_base_delay": 0.01,
        "retry_max_delay": 0.05,
        **(service or {}),
    }
    raw = base_config(tmp_path, service=settings, bitrix24=bitrix24 or {})
    raw["providers"] = providers or {CODE: {"plugin": "scripted", "name": "Scripted"}}
    config = validate_config(raw, environ={})
    pm = make_plugin_manager(environ={"B24SMS_LOAD_PLUGINS": ""})
    pm.register(ScriptedPlugin(), name="scripted-test")
    if recorder is not None:
        pm.register(recorder, name="recorder")
    svc = Service(prepare_instance(config), plugin_manager=pm)
    create_schema(svc)
    return svc


def create_schema(svc: Service) -> None:
    """Bring the test database to the newest schema."""
    upgrade(svc.db)


def add_portal(svc: Service, emulated: Any = None, *, state: str = PortalState.ACTIVE) -> int:
    """A portal row: the emulated portal's endpoint and tokens, or a dummy one."""
    with svc.db.session() as session:
        portal = Portal(
            member_id=emulated.member_id if emulated else secrets.token_hex(16),
            domain=emulated.domain if emulated else "unit.example.com",
            client_endpoint=emulated.client_endpoint if emulated else "http://127.0.0.1:9/rest/",
            server_endpoint=None,
            access_token=emulated.access_token if emulated else "a" * 70,
            refresh_token=emulated.refresh_token if emulated else "r" * 70,
            application_token=emulated.application_token if emulated else "t" * 32,
            state=state,
        )
        session.add(portal)
        session.flush()
        return portal.id


def add_message(
    svc: Service,
    portal_id: int,
    *,
    code: str = CODE,
    to: str | None = "+14155550100",
    message_id: str | None = None,
    emulated: Any = None,
) -> int:
    """A stored, queued message (and its record on the emulated portal, if given)."""
    message_id = message_id or secrets.token_hex(16)
    if emulated is not None:
        emulated.messages[message_id] = {"code": code, "to": to, "body": "hi", "statuses": []}
    with svc.db.session() as session:
        # A bare queued row, without the HANDLER's first history entry, so the tests see
        # exactly the statuses delivery records.
        now = utcnow()
        message = Message(
            portal_id=portal_id,
            code=code,
            message_id=message_id,
            to_raw=to or "garbage",
            to=to,
            body="secret body text",
            module_id="crm",
            context={},
            status="queued",
            attempts=0,
            next_attempt_at=now,
            created_at=now,
            updated_at=now,
        )
        session.add(message)
        session.flush()
        return message.id


def load(svc: Service, message_pk: int) -> Message:
    with svc.db.session() as session:
        return session.get(Message, message_pk)


def history(svc: Service, message_pk: int) -> list[tuple[str, str, bool]]:
    with svc.db.session() as session:
        rows = session.scalars(
            select(StatusEvent).where(StatusEvent.message_pk == message_pk).order_by(StatusEvent.id)
        ).all()
        return [(e.status, e.source, e.applied) for e in rows]


def outbox(svc: Service) -> list[tuple[int, str, int]]:
    with svc.db.session() as session:
        rows = session.scalars(select(OutboxEntry).order_by(OutboxEntry.id)).all()
        return [(e.message_pk, e.status, e.version) for e in rows]


def gateway(svc: Service) -> ScriptedGateway:
    gw = svc.gateways[CODE]
    assert isinstance(gw, ScriptedGateway)
    return gw


# -- the b24sms command, as a process ------------------------------------------------------------


def b24sms(
    *args: str, config: Path | None = None, cwd: Path | None = None, timeout: float = 60
) -> subprocess.CompletedProcess:
    """Run the ``b24sms`` command in a fresh process (no ``B24SMS_*`` variable of ours leaks
    in), with ``config`` as ``B24SMS_CONFIG``; the result is returned, never raised."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("B24SMS_")}
    if config is not None:
        env["B24SMS_CONFIG"] = str(config)
    return subprocess.run(
        [sys.executable, "-c", "from b24sms.cli import main; main()", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=cwd or REPO,
    )


def write_config(tmp_path: Path, public_url: str, oauth_url: str, providers: str) -> Path:
    """A config file for the command: SQLite in ``tmp_path``, the test app's credentials,
    ``providers`` as TOML text (e.g. :data:`LOG_PROVIDER`)."""
    path = tmp_path / "b24sms.toml"
    path.write_text(f"""
[service]
public_url = "{public_url}"
secret_key = "{SECRET_KEY}"
database_url = "sqlite:///{tmp_path}/cli.sqlite3"
queue_url = "memory://"

[bitrix24]
client_id = "{CLIENT_ID}"
client_secret = "{CLIENT_SECRET}"
oauth_url = "{oauth_url}"
{providers}
""")
    return path


LOG_PROVIDER = """
[providers.smslog]
plugin = "log"
name = "Log only"
"""


# -- the app page, opened as Bitrix24's frame opens it -------------------------------------------


def frame_query(auth: dict[str, str]) -> dict[str, str]:
    """What Bitrix24 puts in the frame URL's query; the rest travels in the POST body."""
    return {k: auth[k] for k in ("DOMAIN", "PROTOCOL", "LANG", "APP_SID")}


def frame_body(auth: dict[str, str]) -> dict[str, str]:
    """What Bitrix24 sends in the frame's POST body (AUTH_ID, member_id, …)."""
    return {k: v for k, v in auth.items() if k not in frame_query(auth)}


def open_page(server, auth: dict[str, str], **headers: str) -> requests.Response:
    """POST the placement form the way Bitrix24's frame does."""
    return requests.post(
        f"{server.url}/app",
        params=frame_query(auth),
        data=frame_body(auth),
        headers=headers,
        timeout=10,
    )


# -- every log record ----------------------------------------------------------------------------

#: loggers of the test doubles standing in for other parties (the SMTP server's protocol log)
FOREIGN_LOGGERS = ("mail.log",)


class Capture(logging.Handler):
    """Every record, formatted as text (with traceback) and as JSON (with extra fields)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self._text = logging.Formatter("%(name)s %(levelname)s %(message)s")
        self._json = logs.JsonFormatter()

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith(FOREIGN_LOGGERS):
            return
        self.lines.append(self._text.format(record))
        self.lines.append(self._json.format(record))


def stored_portal(server: Any, member_id: str) -> Portal:
    """The portal row a live server stored for ``member_id``, detached from its session."""
    with server.app.extensions["b24sms"].db.session() as session:
        row = session.scalar(select(Portal).where(Portal.member_id == member_id))
        assert row is not None, member_id
        session.expunge(row)
        return row
