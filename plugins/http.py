"""The ``http`` gateway: any SMS API that takes one HTTP request per message, set up in TOML.

Most SMS providers answer "POST these fields, get an id back, receive delivery reports on a
webhook". This gateway describes such an API with options instead of code::

    [providers.acme]
    plugin = "http"
    url = "https://api.acme-sms.example/v1/messages"
    encoding = "json"
    headers = { Authorization = "Bearer ${ACME_TOKEN}" }
    body = { to = "{to}", text = "{body}", reference = "{id}", notify_url = "{callback_url}" }
    response_id = "messages.0.id"
    response_status = "messages.0.status"
    callback_id = "id"
    callback_status = "status"
    callback_secret = "${ACME_WEBHOOK_SECRET}"
    statuses = { ACCEPTED = "queued", DELIVRD = "delivered", UNDELIV = "undelivered" }

Placeholders in the string values of ``body``: ``{to}`` (E.164), ``{body}``, ``{message_id}``
(Bitrix24's id), ``{id}`` (ours, stable across retries), ``{code}``, ``{callback_url}``;
``{{`` and ``}}`` are literal braces. Substitution is one pass over the configured template,
so a message text holding ``{to}`` stays as written.

Connections are pooled: one :class:`requests.Session` per provider, its pool as large as the
number of sends the core runs at once (``GatewayContext.concurrency`` when the core sets it, else
32), so concurrent sends from several threads reuse kept-alive connections instead of opening
one each. ``idempotency_header`` (e.g. ``"Idempotency-Key"``; default none) sends
``idempotency_key`` (default ``"{id}"``: our id, the same on every retry) with each request, so
a re-send after a crash is harmless at a gateway that honours the header.

Answers: 2xx is accepted; 429 and 5xx, timeouts and connection errors are retried (honouring
``Retry-After``); other 4xx fail the message at once. Delivery reports must be signed: without a
``callback_secret`` every callback is rejected, because an unauthenticated report would let
anyone mark messages delivered. The signature covers a timestamp
(``X-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">``): a report outside
``callback_max_age`` seconds is refused and the same signed request again changes nothing.
Old-style signatures of the body alone are refused unless ``callback_legacy_signatures`` is
on (docs/plugins.md, "Signing delivery reports").
"""

from __future__ import annotations

import hashlib
import hmac
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, ClassVar
from urllib.parse import parse_qsl, urlsplit

import requests
from marshmallow import Schema, ValidationError, fields, validate, validates_schema
from requests.adapters import HTTPAdapter

from b24sms import __version__, hookimpl
from b24sms.gateway import (
    CallbackInvalid,
    CallbackRejected,
    CallbackRequest,
    Gateway,
    GatewayContext,
    OutgoingMessage,
    PermanentGatewayError,
    RetryableGatewayError,
    SendResult,
    StatusReport,
    check_http_url,
    retry_after_seconds,
)
from b24sms.redaction import SECRET_NAME
from b24sms.statuses import SENT, STATUSES

#: the placeholders a ``body`` string may use
PLACEHOLDERS = ("to", "body", "message_id", "id", "code", "callback_url")
_PLACEHOLDER_RE = re.compile(r"\{\{|\}\}|\{([^{}]*)\}")
#: the placeholders an ``idempotency_key`` may use: ours alone, never what a portal sent
KEY_PLACEHOLDERS = ("id", "code")
#: sends in flight at once through one gateway when the core does not say
DEFAULT_CONCURRENCY = 32
_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")

#: seconds an old-style (body-only) signature is remembered against replays
LEGACY_REPLAY_MEMORY = 7 * 24 * 3600.0
_SIGNATURE_FIELD = re.compile(r"^\s*([A-Za-z0-9]+)=([^,\s]*)\s*$")


def timestamped_signature(secret: str, timestamp: str, body: bytes) -> str:
    """The hex HMAC-SHA256 of ``<timestamp>.<body>`` under ``secret`` (``v1=`` of the header)."""
    message = timestamp.encode("ascii") + b"." + body
    return hmac.new(secret.encode("utf-8"), message, hashlib.sha256).hexdigest()


def parse_signature_header(value: str) -> tuple[str, list[str]] | None:
    """``t=1733112000,v1=<hex>[,v1=<hex>]`` → (timestamp, signatures); None for anything
    else (an old-style signature of the body alone)."""
    timestamp, signatures = None, []
    for part in value.split(","):
        match = _SIGNATURE_FIELD.match(part)
        if match is None:
            return None
        name, field_value = match.groups()
        if name == "t" and field_value.isdigit() and len(field_value) <= 12:
            timestamp = field_value
        elif name == "v1":
            signatures.append(field_value.lower())
    if timestamp is None or not signatures:
        return None
    return timestamp, signatures


class ReplayGuard:
    """Keys of signed requests already applied, each kept for a while (in this process).

    Bounded: past ``limit`` keys the oldest are forgotten first.
    """

    def __init__(self, limit: int = 100_000) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._until: OrderedDict[str, float] = OrderedDict()

    def seen(self, key: str) -> bool:
        """Whether ``key`` was remembered and has not expired."""
        with self._lock:
            until = self._until.get(key)
            return until is not None and until > time.monotonic()

    def remember(self, key: str, seconds: float) -> None:
        """Remember ``key`` for ``seconds``."""
        now = time.monotonic()
        with self._lock:
            self._until[key] = now + seconds
            self._until.move_to_end(key)
            while self._until and (
                len(self._until) > self.limit or next(iter(self._until.values())) <= now
            ):
                self._until.popitem(last=False)


def template_fields(template: str) -> list[str]:
    """The placeholder names in ``template`` (``{{``/``}}`` are escapes, not placeholders)."""
    names = []
    for match in _PLACEHOLDER_RE.finditer(template):
        if match.group(0) not in ("{{", "}}"):
            names.append(match.group(1))
    return names


def render(template: str, values: Mapping[str, str]) -> str:
    """Substitute ``{name}`` from ``values`` in one pass; no format spec, no attribute access."""

    def substitute(match: re.Match[str]) -> str:
        token = match.group(0)
        if token == "{{":
            return "{"
        if token == "}}":
            return "}"
        return values[match.group(1)]

    return _PLACEHOLDER_RE.sub(substitute, template)


def render_body(value: Any, values: Mapping[str, str]) -> Any:
    """``render`` every string inside a (possibly nested) body table."""
    if isinstance(value, str):
        return render(value, values)
    if isinstance(value, Mapping):
        return {key: render_body(item, values) for key, item in value.items()}
    if isinstance(value, list):
        return [render_body(item, values) for item in value]
    return value


_MISSING = object()


def dig(data: Any, path: str) -> Any:
    """The value at a dotted ``path`` (``messages.0.id``) in parsed JSON, or ``_MISSING``.

    A key that itself contains dots is found too when it is present literally.
    """
    if isinstance(data, Mapping) and path in data:
        return data[path]
    for part in path.split("."):
        if isinstance(data, Mapping) and part in data:
            data = data[part]
        elif (
            isinstance(data, list)
            and part.lstrip("-").isdigit()
            and -len(data) <= int(part) < len(data)
        ):
            data = data[int(part)]
        else:
            return _MISSING
    return data


def _check_body(value: Any, path: str = "body", *, nested_ok: bool = True) -> None:
    """Every string's placeholders are known; only JSON bodies may nest."""
    if isinstance(value, str):
        for name in template_fields(value):
            if name not in PLACEHOLDERS:
                known = ", ".join("{" + p + "}" for p in PLACEHOLDERS)
                raise ValidationError(
                    f"{path}: unknown placeholder {{{name}}} (known: {known}; "
                    "write {{ and }} for literal braces)"
                )
    elif isinstance(value, Mapping):
        if not nested_ok and path != "body":
            raise ValidationError(f'{path}: nested tables need encoding = "json"')
        for key, item in value.items():
            _check_body(item, f"{path}.{key}", nested_ok=nested_ok)
    elif isinstance(value, list):
        if not nested_ok:
            raise ValidationError(f'{path}: lists need encoding = "json"')
        for index, item in enumerate(value):
            _check_body(item, f"{path}[{index}]", nested_ok=nested_ok)
    elif value is not None and not isinstance(value, (bool, int, float)):
        raise ValidationError(f"{path}: unsupported value {type(value).__name__}")


def _check_idempotency_key(template: str) -> None:
    """Our own values only, and ``{id}`` among them: a key without it would be the same for
    every message, and a gateway honouring it would drop all but the first."""
    names = template_fields(template)
    unknown = [name for name in names if name not in KEY_PLACEHOLDERS]
    if unknown:
        raise ValidationError(f"unknown placeholder {{{unknown[0]}}} (known: {{id}}, {{code}})")
    if "id" not in names:
        raise ValidationError("must contain {id}, or every message would share one key")
    if not template.isascii() or not template.isprintable():
        raise ValidationError("must be printable ASCII (it is sent as a header value)")


class HttpOptions(Schema):
    """Options of the ``http`` gateway."""

    url = fields.String(required=True, validate=check_http_url)
    method = fields.String(
        load_default="POST", validate=validate.OneOf(("POST", "PUT", "PATCH", "GET"))
    )
    encoding = fields.String(load_default="json", validate=validate.OneOf(("json", "form")))
    headers = fields.Dict(keys=fields.String(), values=fields.String(), load_default=dict)
    body = fields.Dict(keys=fields.String(), load_default=lambda: {"to": "{to}", "text": "{body}"})
    response_id = fields.String(load_default=None)
    response_status = fields.String(load_default=None)
    callback_id = fields.String(load_default=None)
    callback_status = fields.String(load_default=None)
    callback_secret = fields.String(load_default=None, validate=validate.Length(min=16))
    callback_signature_header = fields.String(load_default="X-Signature")
    #: seconds a signed report's timestamp may be away from our clock (``t=`` of the signature)
    callback_max_age = fields.Float(
        load_default=300.0, validate=validate.Range(min=1, max=24 * 3600)
    )
    #: also accept the old signature of the body alone (no timestamp; see docs/plugins.md)
    callback_legacy_signatures = fields.Boolean(load_default=False)
    statuses = fields.Dict(
        keys=fields.String(),
        values=fields.String(validate=validate.OneOf(STATUSES)),
        load_default=dict,
    )
    timeout = fields.Float(load_default=10.0, validate=validate.Range(min=0, min_inclusive=False))
    #: the header that carries ``idempotency_key`` (e.g. ``Idempotency-Key``); none: not sent
    idempotency_header = fields.String(
        load_default=None,
        validate=validate.Regexp(_HEADER_NAME, error="must be an HTTP header name"),
    )
    #: the key's template: ``{id}`` (ours, the same on every retry) and ``{code}``
    idempotency_key = fields.String(load_default="{id}", validate=_check_idempotency_key)

    @validates_schema
    def _check(self, data: dict[str, Any], **kwargs: Any) -> None:
        try:
            _check_body(
                data.get("body", {}),
                nested_ok=data.get("encoding") == "json" and data.get("method") != "GET",
            )
        except ValidationError as exc:
            raise ValidationError(exc.messages, "body") from None
        if data.get("callback_secret") and not (
            data.get("callback_id") and data.get("callback_status")
        ):
            raise ValidationError(
                "callback_secret needs callback_id and callback_status too", "callback_id"
            )


class HttpGateway(Gateway):
    """A generic HTTP SMS API described entirely by its options (see the module docstring)."""

    name: ClassVar[str] = "http"
    options_schema: ClassVar[type[Schema]] = HttpOptions
    #: the five statuses stand for themselves; the ``statuses`` option adds the gateway's words
    statuses: Mapping[str, str] = {word: word for word in STATUSES}
    example_options: ClassVar[dict[str, Any]] = {
        "url": "http://127.0.0.1:9/send",
        "response_id": "id",
        "callback_id": "id",
        "callback_status": "status",
        "callback_secret": "example-callback-secret",
    }

    def __init__(self, options: Mapping[str, Any], context: GatewayContext) -> None:
        super().__init__(options, context)
        self.statuses = {**type(self).statuses, **options["statuses"]}
        self.callbacks = bool(options["callback_secret"])
        parts = urlsplit(options["url"])
        #: what log lines and errors name: never the query string or credentials of the URL
        self.target = f"{parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}"
        self._secrets = self._collect_secrets(options)
        self._replays = ReplayGuard()
        #: the verified report being handled by this thread, remembered once it was applied
        self._pending = threading.local()
        #: sends the core may run at once through this instance: the pool keeps as many
        self.concurrency = max(1, int(getattr(context, "concurrency", 0) or DEFAULT_CONCURRENCY))
        # One session shared by every sending thread: its headers are set here, once, and
        # never touched again; each request's own values travel as arguments. urllib3's pool
        # is thread-safe; requests' default adapter would keep only 10 connections per host.
        self._session = requests.Session()
        self._session.headers["User-Agent"] = f"b24sms/{__version__}"
        self._session.headers.update(options["headers"])
        adapter = HTTPAdapter(pool_maxsize=self.concurrency)
        self._session.mount("https://", adapter)
        self._session.mount("http://", adapter)

    @staticmethod
    def _collect_secrets(options: Mapping[str, Any]) -> list[str]:
        """Strings that must not appear in an error message, longest first."""
        found = list(options["headers"].values())
        # "Bearer abc…": an answer may repeat the credential without its scheme.
        found.extend(v.split(" ", 1)[1] for v in options["headers"].values() if " " in v)
        if options["callback_secret"]:
            found.append(options["callback_secret"])
        parts = urlsplit(options["url"])
        if parts.password:
            found.append(parts.password)
        found.extend(value for _, value in parse_qsl(parts.query))

        def walk(value: Any, key: str = "") -> None:
            if isinstance(value, Mapping):
                for k, v in value.items():
                    walk(v, str(k))
            elif isinstance(value, list):
                for v in value:
                    walk(v, key)
            elif isinstance(value, str) and SECRET_NAME.search(key):
                found.append(value)

        walk(options["body"])
        return sorted({s for s in found if len(s) >= 4}, key=len, reverse=True)

    def _redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    # sending -------------------------------------------------------------------------------

    def _values(self, message: OutgoingMessage) -> dict[str, str]:
        return {
            "to": message.to,
            "body": message.body,
            "message_id": message.message_id,
            "id": str(message.id),
            "code": message.code,
            "callback_url": message.callback_url,
        }

    def send(self, message: OutgoingMessage) -> SendResult:
        """One request per message; the answer's id and status are read by the dotted paths."""
        options = self.options
        body = render_body(options["body"], self._values(message))
        kwargs: dict[str, Any] = {"timeout": options["timeout"], "allow_redirects": False}
        if options["idempotency_header"]:
            key = render(options["idempotency_key"], {"id": str(message.id), "code": self.code})
            kwargs["headers"] = {options["idempotency_header"]: key}
        if options["method"] == "GET":
            kwargs["params"] = body
        elif options["encoding"] == "json":
            kwargs["json"] = body
        else:
            kwargs["data"] = body
        try:
            response = self._session.request(options["method"], options["url"], **kwargs)
        except requests.Timeout:
            raise RetryableGatewayError(
                f"no answer from {self.target} within {options['timeout']:g} s", code="timeout"
            ) from None
        except requests.ConnectionError as exc:
            raise RetryableGatewayError(
                f"cannot connect to {self.target}: {type(exc).__name__}", code="connection"
            ) from None
        except requests.RequestException as exc:
            raise PermanentGatewayError(
                f"request to {self.target} failed: {type(exc).__name__}", code="request"
            ) from None
        with response:
            return self._result(response)

    def _result(self, response: requests.Response) -> SendResult:
        status_code = response.status_code
        if not 200 <= status_code < 300:
            self._raise_for(response)
        self.logger.debug("%s answered %s", self.target, status_code)
        id_path, status_path = self.options["response_id"], self.options["response_status"]
        if not (id_path or status_path):
            return SendResult(external_id=None, raw_status="accepted", status=SENT)
        try:
            answer = response.json()
        except ValueError:
            # Accepted with 2xx: the message has most likely gone out, so never send it again.
            self.logger.warning(
                "%s accepted the message (HTTP %s) but the answer is not JSON; "
                "delivery reports cannot be matched",
                self.target,
                status_code,
            )
            return SendResult(external_id=None, raw_status="accepted", status=SENT)
        external_id = None
        if id_path:
            value = dig(answer, id_path)
            if value is _MISSING or value is None or isinstance(value, (dict, list)):
                self.logger.warning(
                    "%s accepted the message (HTTP %s) but its answer has no %r (response_id); "
                    "delivery reports cannot be matched",
                    self.target,
                    status_code,
                    id_path,
                )
            else:
                external_id = str(value)
        if status_path:
            value = dig(answer, status_path)
            if value is not _MISSING and value is not None and not isinstance(value, (dict, list)):
                raw_status = str(value)
                status = self.map_status(raw_status)
                if status is None:
                    self.logger.warning(
                        "unknown status %r in the answer of %s; counting the message as sent",
                        raw_status,
                        self.target,
                    )
                    status = SENT
                return SendResult(external_id=external_id, raw_status=raw_status, status=status)
        return SendResult(external_id=external_id, raw_status="accepted", status=SENT)

    def _raise_for(self, response: requests.Response) -> None:
        status_code = response.status_code
        # Redacted before it is cut: a secret across the cut would keep its first part.
        snippet = self._redact(" ".join(response.text.split()))[:200]
        text = f"{self.target} answered HTTP {status_code}" + (f": {snippet}" if snippet else "")
        if status_code == 429 or status_code >= 500:
            raise RetryableGatewayError(
                text,
                code=str(status_code),
                retry_after=retry_after_seconds(response.headers.get("Retry-After")),
            )
        raise PermanentGatewayError(text, code=str(status_code))

    # delivery reports ------------------------------------------------------------------------

    def _verify(self, request: CallbackRequest) -> tuple[str, float]:
        """Check the signature; returns the key that identifies this signed request, and for
        how many seconds a replay of it must be recognised."""
        secret = self.options["callback_secret"]
        name = self.options["callback_signature_header"]
        if not secret:
            raise CallbackRejected(
                f"provider {self.code!r} has no callback_secret: delivery reports are not accepted"
            )
        given = next((v for k, v in request.headers.items() if k.lower() == name.lower()), None)
        if not given or not given.strip():
            raise CallbackRejected(f"no {name} header")
        fields_ = parse_signature_header(given)
        if fields_ is None:
            return self._verify_legacy(secret, name, given.strip(), request.body)
        timestamp, signatures = fields_
        expected = timestamped_signature(secret, timestamp, request.body)
        if not any(hmac.compare_digest(expected.encode(), s.encode()) for s in signatures):
            raise CallbackRejected(f"bad {name} signature")
        max_age = self.options["callback_max_age"]
        if abs(time.time() - int(timestamp)) > max_age:
            raise CallbackRejected(
                f"{name} timestamp {timestamp} is more than {max_age:g} s away from our clock "
                "(a replay, or a clock that is off)"
            )
        # Accepted until t + max_age at most: remembered as long as that.
        return f"v1:{expected}", 2 * max_age

    def _verify_legacy(self, secret: str, name: str, given: str, body: bytes) -> tuple[str, float]:
        if not self.options["callback_legacy_signatures"]:
            raise CallbackRejected(
                f"{name} carries no timestamp (t=…,v1=…; docs/plugins.md), and "
                "callback_legacy_signatures is off"
            )
        if given.lower().startswith("sha256="):
            given = given[len("sha256=") :]
        expected = hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(
            expected.encode("ascii"), given.lower().encode("ascii", "replace")
        ):
            raise CallbackRejected(f"bad {name} signature")
        return f"legacy:{expected}", LEGACY_REPLAY_MEMORY

    def parse_callback(self, request: CallbackRequest) -> list[StatusReport]:
        """Check the HMAC signature and its timestamp, then read id and status by their paths.

        The body is JSON (one object, or a list of objects for a batch) or a form. A request
        whose signature was seen before (a replay) gives no reports: it changes nothing.
        """
        self._pending.key = None
        key, remember_for = self._verify(request)
        reports = self._read_reports(request)
        if self._replays.seen(key):
            self.logger.info("a replayed delivery report for %s was ignored", self.code)
            return []
        self._pending.key = (key, remember_for)
        return reports

    def callback_response(self, reports: list[StatusReport]) -> tuple[str, int, dict[str, str]]:
        """The empty 200; the report's signature is remembered now that it was applied (a
        report that failed to apply stays acceptable for the gateway's retry)."""
        pending = getattr(self._pending, "key", None)
        if pending is not None:
            self._replays.remember(*pending)
            self._pending.key = None
        return super().callback_response(reports)

    def _read_reports(self, request: CallbackRequest) -> list[StatusReport]:
        is_form = bool(request.form) or "x-www-form-urlencoded" in request.content_type
        if is_form:
            items: list[Any] = [dict(request.form)]
        else:
            data = request.json()
            items = data if isinstance(data, list) else [data]
        reports = []
        for item in items:
            external_id = dig(item, self.options["callback_id"])
            raw_status = dig(item, self.options["callback_status"])
            for path, value in (
                (self.options["callback_id"], external_id),
                (self.options["callback_status"], raw_status),
            ):
                if value is _MISSING or value is None or isinstance(value, (dict, list)):
                    raise CallbackInvalid(f"the delivery report has no {path!r}")
            reports.append(StatusReport(raw_status=str(raw_status), external_id=str(external_id)))
        return reports

    def close(self) -> None:
        """Close the pooled connections."""
        self._session.close()


@hookimpl
def b24sms_register_gateways(register) -> None:
    register(HttpGateway)
