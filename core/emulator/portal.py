"""One emulated Bitrix24 portal: its REST server, its state, and the calls it makes to the app.

The REST side answers like ``https://<portal>/rest/``: tokens, the leaky bucket, the
``messageservice.*`` methods, ``batch``, ``app.info`` and ``profile``. The other side plays
Bitrix24's part towards the app: install / update / uninstall events and HANDLER calls, sent
form-encoded with PHP bracket keys exactly as Bitrix24 sends them.
"""

from __future__ import annotations

import itertools
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from secrets import token_hex
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import requests

from .events import EventBindings
from .httpd import HtmlPage, HttpRequest, JSONAnswer, RestError, ServerThread, time_block
from .php_lenient_form import php_form_decode
from .users import INSTALLER, PortalUser, PortalUsers

if TYPE_CHECKING:
    from .server import Emulator

__all__ = ["FINAL_STATUSES", "MESSAGE_STATUSES", "SCOPE", "EmulatedPortal"]

MESSAGE_STATUSES = ("queued", "sent", "delivered", "undelivered", "failed")
FINAL_STATUSES = frozenset({"delivered", "undelivered", "failed"})
SCOPE = "messageservice,crm"
BATCH_LIMIT = 50
HTTP_TIMEOUT = 10.0
# What Bitrix24's outgoing calls identify themselves as.
USER_AGENT = "Bitrix24 Webhook Engine"

# fullmatch, because PHP's preg "$" and Python's "$" both accept a trailing newline.
_CODE_RE = re.compile(r"[a-zA-Z0-9._-]+")

# Default descriptions for injected errors, worded as Bitrix24 words them.
_DESCRIPTIONS = {
    "NO_AUTH_FOUND": "Wrong authorization data",
    "invalid_token": "The access token provided is invalid",
    "expired_token": "The access token provided has expired",
    "QUERY_LIMIT_EXCEEDED": "Too many requests",
    "OVERLOAD_LIMIT": "REST API is blocked due to overload",
    "OPERATION_TIME_LIMIT": "Method is blocked due to operation time limit",
    # messageservice-sender-add.md, -delete.md, -message-status-update.md
    "ACCESS_DENIED": "Application context required",
    "insufficient_scope": (
        "The request requires higher privileges than provided by the access token"
    ),
    "user_access_error": "The user does not have access to the application",
    "ERROR_METHOD_NOT_FOUND": "Method not found!",
    "INTERNAL_SERVER_ERROR": "Internal server error",
    "ERROR_UNEXPECTED_ANSWER": "Server returned an unexpected response",
    "PORTAL_DELETED": "Portal was deleted",
    "PAYMENT_REQUIRED": "Payment required",
}

#: the statuses of a redirect a moved portal may answer with (change-domen.md shows 302)
REDIRECT_STATUS = 302


def _method_not_found() -> RestError:
    return RestError("ERROR_METHOD_NOT_FOUND", "Method not found!", 404)


def _validation(description: str) -> RestError:
    return RestError("ERROR_SENDER_VALIDATION_FAILURE", description, 400)


def _php_empty(value: Any) -> bool:
    """PHP's ``empty()``, which Bitrix24's validators use: "0" counts as empty too."""
    return value is None or value is False or value in ("", "0", 0) or value == {} or value == []


def _truthy(value: Any) -> bool:
    return str(value).strip().lower() in ("1", "y", "yes", "true")


def _check_code(code: Any) -> str:
    if _php_empty(code):
        raise _validation("Empty sender code!")
    if not isinstance(code, str) or not _CODE_RE.fullmatch(code):
        raise _validation("Wrong sender code!")
    return code


def _check_handler(url: Any) -> str:
    wrong = RestError("ERROR_WRONG_HANDLER_URL", "Wrong handler URL", 400)
    if not isinstance(url, str) or not url.strip():
        raise wrong
    try:
        parts = urlsplit(url.strip())
        host = parts.hostname or ""
    except ValueError:
        raise wrong from None
    if parts.scheme.lower() not in ("http", "https"):
        if parts.scheme and parts.netloc:
            raise RestError("ERROR_UNSUPPORTED_PROTOCOL", "Unsupported event handler protocol", 400)
        raise wrong
    # "URLs without a domain, including localhost, do not pass the check" is documented for
    # placement.bind (api-reference/widgets/index.md); we assume the same for messageservice
    # HANDLERs, whose pages do not say.
    if "." not in host:
        raise wrong
    return url.strip()


def _messageservice_params(params: Mapping[str, Any]) -> dict[str, Any]:
    # messageservice methods run array_change_key_case(CASE_UPPER) on their input.
    return {str(key).upper(): value for key, value in params.items() if key != "auth"}


@dataclass
class _Injection:
    error: str
    status: int
    remaining: int
    methods: frozenset[str] | None
    description: str

    def answer(self) -> RestError:
        # An error body is {"error", "error_description"} only (_includes/error-info.md).
        return RestError(self.error, self.description, self.status)


class _MovedAddress:
    """What a renamed portal's old address answers: a redirect to the same path at the new one
    (settings/how-to-call-rest-api/change-domen.md)."""

    def __init__(self, new_base_url: str) -> None:
        self.new_base_url = new_base_url

    def handle_http(self, request: HttpRequest) -> tuple[int, Any, dict[str, str]]:
        location = self.new_base_url + request.path
        if request.query:
            location += "?" + urlencode(request.query)
        return REDIRECT_STATUS, {}, {"Location": location}


class EmulatedPortal:
    """A Bitrix24 portal with our app on it, served by its own loopback HTTP server.

    Create portals with :meth:`Emulator.add_portal`. A new portal already has the app installed
    silently (a valid token pair and an ``application_token``), so REST clients can be tested
    without an app; :meth:`install` issues new credentials and tells an app about them.

    Public state, readable at any time (mutations happen under the portal's lock):

    - ``member_id``, ``domain`` (assignable, to emulate a renamed portal), ``client_endpoint``
    - ``access_token``, ``refresh_token`` (the newest pair), ``application_token``
    - ``senders``: CODE -> ``{"CODE", "TYPE", "HANDLER", "NAME", "DESCRIPTION"}``
    - ``messages``: message_id -> ``{"code", "to", "body", "module_id", "statuses": [...]}``
    - ``stats``: ``requests`` (every REST request), ``rejected_rate_limit``, ``injected``,
      ``refreshes``, ``batches`` and ``status_updates`` (batches and status.update commands,
      inside batches too, that got past the bucket, injected errors and the token check),
      ``methods`` (a Counter of every method name received, batch commands included)
    - ``request_log``: ``(time, method, n_commands, http_status)`` per REST request
    - ``supports_sender_update``: set False to emulate a portal without ``sender.update``
    - ``php_empty_arrays``: set True to answer empty batch parts as ``[]``, as real portals do
    - ``requests_per_second``, ``burst``: this portal's leaky bucket
    - ``app_url``, ``app_version``, ``installed``, ``install_finished``
    - ``events``: the handlers the app bound (:class:`~.events.EventBindings`); ONAPPUPDATE,
      ONAPPUNINSTALL and ONAPPPAYMENT reach the app only through them
    - ``update_deletes_senders``, ``uninstall_deletes_senders``, ``app_status``,
      ``payment_expired``, ``payment_required``, ``operating_window``,
      ``method_blocks`` (see :meth:`limit_method`); :meth:`change_domain` moves the portal
    """

    def __init__(
        self,
        emulator: Emulator,
        *,
        domain: str | None = None,
        member_id: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.emulator = emulator
        self._lock = threading.RLock()
        self.member_id: str = member_id or token_hex(16)
        self.senders: dict[str, dict[str, Any]] = {}
        self.messages: dict[str, dict[str, Any]] = {}
        self.stats: dict[str, Any] = {
            "requests": 0,
            "rejected_rate_limit": 0,
            "injected": 0,
            "refreshes": 0,
            "status_updates": 0,
            "batches": 0,
            "methods": Counter(),
        }
        self.request_log: list[tuple[float, str, int, int]] = []
        self.supports_sender_update = True
        self.php_empty_arrays = False
        self.requests_per_second: float = emulator.requests_per_second
        self.burst: float = emulator.burst
        self.app_url: str | None = None
        self.app_version = 1
        self.installed = True
        # Event installs finish at once; a UI install only when its page calls installFinish.
        self.install_finished = True
        self.access_token: str = ""
        self.refresh_token: str = ""
        self.access_expires_at = 0.0
        self.application_token: str = token_hex(16)
        self._access: dict[str, float] = {}
        self._refresh: set[str] = set()
        #: who holds which token: the installer's pair, or another user's (:meth:`user_auth`)
        self.users = PortalUsers()
        self._injections: list[_Injection] = []
        #: seconds a REST method waits before it is answered, by method (tests set it any time)
        self.rest_delays: dict[str, float] = {}
        #: pages of the portal's own UI (path -> HTML), served on GET: see :meth:`serve_page`
        self.pages: dict[str, str] = {}
        self._bucket = 0.0
        self._bucket_at = time.monotonic()
        self._owner_ids = itertools.count(1)
        #: the handlers the app bound with event.bind; events go to these only
        self.events = EventBindings()
        #: docs are silent on whether an app update removes the app's providers (event-bind.md
        #: says only handlers); True plays the worse case
        self.update_deletes_senders = True
        #: settings/app-uninstallation.md does not list SMS providers among what an uninstall
        #: deletes; True assumes it deletes them like the app's other handlers
        self.uninstall_deletes_senders = True
        #: app.info's STATUS: L local, F free, D demo, T trial, P paid (app-info.md)
        self.app_status = "L"
        #: app.info answers PAYMENT_EXPIRED "Y" with a negative DAYS (app-info.md)
        self.payment_expired = False
        #: every REST call answers HTTP 402 PAYMENT_REQUIRED. AN ASSUMPTION: the documented
        #: signals are the OAuth server's PAYMENT_REQUIRED (settings/oauth/error-codes.md) and
        #: app.info's PAYMENT_EXPIRED; custom-methods.md shows a 402 only for an on-premise
        #: module's own methods (CRestServer::STATUS_PAYMENT_REQUIRED), not that REST answers it
        self.payment_required = False
        #: method -> unix time its OPERATION_TIME_LIMIT block ends (settings/performance/limits.md)
        self.method_blocks: dict[str, float] = {}
        #: seconds a one-minute basket of a method's time counts: Bitrix24's is 10 minutes
        #: (limits.md); tests shorten it to see operating_reset_at come soon
        self.operating_window = 600.0
        #: method -> {minute: [first call, seconds spent]}
        self._operating: dict[str, dict[int, list[float]]] = {}
        self._moved_servers: list[ServerThread] = []
        self._issue_pair_locked()
        self._server = ServerThread(self, host, port)
        self.domain: str = domain or f"{host}:{self._server.port}"

    def __repr__(self) -> str:
        return f"<EmulatedPortal {self.domain} member_id={self.member_id}>"

    # -- addresses -------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The TCP port of this portal's server."""
        return self._server.port

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:<port>``."""
        return self._server.base_url

    @property
    def client_endpoint(self) -> str:
        """``http://127.0.0.1:<port>/rest/``: where REST calls go."""
        return f"{self._server.base_url}/rest/"

    def stop(self) -> None:
        """Stop this portal's server (the emulator's :meth:`Emulator.stop` does it for all)."""
        self._server.stop()
        for server in self._moved_servers:
            server.stop()

    def change_domain(self, domain: str | None = None) -> str:
        """Move the portal to a new address, as a renamed Bitrix24 does
        (settings/how-to-call-rest-api/change-domen.md): a new REST server answers from now on,
        and the old address answers every request with a 302 to the same path there.

        :param domain: the new domain; default ``127.0.0.1:<new port>``.
        :returns: the new ``client_endpoint``.
        """
        with self._lock:
            old = self._server
            self._server = ServerThread(self, old.host, 0)
            self._moved_servers.append(old)
            old.serve(_MovedAddress(self._server.base_url))
            self.domain = domain or f"{old.host}:{self._server.port}"
        return self.client_endpoint

    # -- tokens ----------------------------------------------------------------------------------

    def _issue_pair_locked(self) -> None:
        # 70 hex characters, the length of real Bitrix24 tokens: catches columns sized too small.
        access, refresh = token_hex(35), token_hex(35)
        self.access_expires_at = time.time() + self.emulator.token_ttl
        self._access[access] = self.access_expires_at
        self._refresh.add(refresh)
        self.access_token, self.refresh_token = access, refresh

    def _issue_user_pair_locked(self, user: PortalUser) -> tuple[str, str, float]:
        # Another user's pair: valid like the installer's, but not the app's newest pair.
        access, refresh = token_hex(35), token_hex(35)
        expires_at = time.time() + self.emulator.token_ttl
        self._access[access] = expires_at
        self._refresh.add(refresh)
        self.users.assign(user, access, refresh)
        return access, refresh, expires_at

    def _redeem_refresh_token(self, refresh_token: str) -> tuple[str, str, float] | None:
        """Spend ``refresh_token`` and issue a new pair to the same user, atomically; None if
        it is not ours."""
        with self._lock:
            if refresh_token not in self._refresh:
                return None
            self._refresh.discard(refresh_token)
            self.stats["refreshes"] += 1
            user = self.users.owner(refresh_token)
            if user != INSTALLER:
                return self._issue_user_pair_locked(user)
            self._issue_pair_locked()
            return self.access_token, self.refresh_token, self.access_expires_at

    def expire_tokens(self) -> None:
        """Make every access token issued so far expired (refresh tokens stay usable)."""
        with self._lock:
            past = time.time() - 1
            for token in self._access:
                self._access[token] = min(self._access[token], past)

    def revoke_tokens(self) -> None:
        """Forget every token (``invalid_token`` / ``invalid_grant``) without uninstalling."""
        with self._lock:
            self._access.clear()
            self._refresh.clear()

    def _check_auth(self, token: Any) -> None:
        if not isinstance(token, str) or not token:
            raise RestError("NO_AUTH_FOUND", _DESCRIPTIONS["NO_AUTH_FOUND"], 401)
        with self._lock:
            expires_at = self._access.get(token)
        if expires_at is None:
            raise RestError("invalid_token", _DESCRIPTIONS["invalid_token"], 401)
        if expires_at <= time.time():
            raise RestError("expired_token", _DESCRIPTIONS["expired_token"], 401)

    # -- fault injection -------------------------------------------------------------------------

    def inject(
        self,
        error: str,
        status: int,
        count: int = 1,
        methods: Iterable[str] | str | None = None,
        description: str | None = None,
    ) -> None:
        """Make the next ``count`` REST calls answer ``{"error": error}`` with HTTP ``status``.

        Injected errors are answered after the rate limit and before the token check.

        :param methods: only calls of these methods count. Without it, any request matches
            (a batch as a whole); with it, commands inside a batch match too, and their error
            lands in ``result_error``.
        :param description: ``error_description``; a Bitrix24-like default otherwise.
        """
        if isinstance(methods, str):
            methods = [methods]
        chosen = frozenset(m.lower() for m in methods) if methods is not None else None
        with self._lock:
            self._injections.append(
                _Injection(
                    error,
                    status,
                    count,
                    chosen,
                    description or _DESCRIPTIONS.get(error, error),
                )
            )

    def limit_method(self, method: str, reset_in: float) -> None:
        """Spend ``method``'s time budget: every call of it, alone or inside a batch, answers
        429 ``OPERATION_TIME_LIMIT`` until ``reset_in`` seconds from now; other methods keep
        working (settings/performance/limits.md). The error tells no reset time (the page
        sends the app to "operating_reset_at from the last successful response").
        """
        with self._lock:
            self.method_blocks[method.lower()] = time.time() + reset_in

    def _method_block_locked(self, method: str) -> RestError | None:
        until = self.method_blocks.get(method)
        if until is None or until <= time.time():
            return None
        return RestError("OPERATION_TIME_LIMIT", _DESCRIPTIONS["OPERATION_TIME_LIMIT"], 429)

    def _operating_locked(self, method: str, started: float, finished: float) -> dict[str, Any]:
        """``operating`` and ``operating_reset_at`` of a single call of ``method``: its time is
        summed in one-minute baskets, each dropped :attr:`operating_window` seconds after its
        first call; ``operating_reset_at`` is when the oldest basket goes (limits.md)."""
        baskets = self._operating.setdefault(method, {})
        for minute in [
            m for m, (first, _) in baskets.items() if first + self.operating_window <= finished
        ]:
            del baskets[minute]
        basket = baskets.setdefault(int(started // 60), [started, 0.0])
        basket[1] += finished - started
        oldest = min(first for first, _ in baskets.values())
        return {
            "operating": round(sum(spent for _, spent in baskets.values()), 6),
            "operating_reset_at": int(oldest + self.operating_window),
        }

    def _take_injection_locked(self, method: str, top_level: bool) -> _Injection | None:
        for injection in self._injections:
            if injection.methods is None and not top_level:
                continue
            if injection.methods is not None and method not in injection.methods:
                continue
            injection.remaining -= 1
            if injection.remaining <= 0:
                self._injections.remove(injection)
            self.stats["injected"] += 1
            return injection
        return None

    # -- the REST server -------------------------------------------------------------------------

    def _admit_locked(self) -> bool:
        now = time.monotonic()
        drained = (now - self._bucket_at) * self.requests_per_second
        self._bucket = max(0.0, self._bucket - drained)
        self._bucket_at = now
        if self._bucket + 1 > self.burst:
            return False
        self._bucket += 1
        return True

    def handle_http(self, request: HttpRequest) -> JSONAnswer:
        """Answer one HTTP request to this portal (called by the server thread)."""
        if not request.path.startswith("/rest/"):
            page = self.pages.get(request.path) if request.verb == "GET" else None
            if page is not None:
                return 200, HtmlPage(page)
            return 404, _method_not_found().body()
        method = request.path[len("/rest/") :].strip("/").lower()
        method = method.removesuffix(".json")
        delay = self.rest_delays.get(method, 0.0)
        if delay > 0:
            time.sleep(delay)  # a slow method
        started = time.time()
        status, payload, commands = self._answer_rest(method, request, started)
        with self._lock:
            self.request_log.append((started, method, commands, status))
        return status, payload

    def _answer_rest(
        self, method: str, request: HttpRequest, started: float
    ) -> tuple[int, Any, int]:
        # Parsed up front so that even a rejected request is logged with its command count.
        params: dict[str, Any] = {}
        bad_request: RestError | None = None
        try:
            params = request.params()
        except RestError as exc:
            bad_request = exc
        commands = 1
        if method == "batch":
            cmd = params.get("cmd")
            commands = len(cmd) if isinstance(cmd, dict | list) else 0
        with self._lock:
            self.stats["requests"] += 1
            self.stats["methods"][method] += 1
            if not self._admit_locked():
                self.stats["rejected_rate_limit"] += 1
                error = RestError(
                    "QUERY_LIMIT_EXCEEDED", _DESCRIPTIONS["QUERY_LIMIT_EXCEEDED"], 503
                )
                return error.status, error.body(), commands
            injection = self._take_injection_locked(method, top_level=True)
            blocked = self._method_block_locked(method)
        try:
            if injection is not None:
                raise injection.answer()
            if bad_request is not None:
                raise bad_request
            self._check_auth(params.get("auth"))
            if self.payment_required:
                raise RestError("PAYMENT_REQUIRED", _DESCRIPTIONS["PAYMENT_REQUIRED"], 402)
            if blocked is not None:
                raise blocked
            result = self._batch(params) if method == "batch" else self._call(method, params)
        except RestError as exc:
            return exc.status, exc.body(), commands
        finished = time.time()
        timing = time_block(started, finished)
        if method != "batch":
            with self._lock:
                timing.update(self._operating_locked(method, started, finished))
        return 200, {"result": result, "time": timing}, commands

    def _batch(self, params: Mapping[str, Any]) -> dict[str, Any]:
        cmd = params.get("cmd")
        if isinstance(cmd, list):
            cmd = {str(index): command for index, command in enumerate(cmd)}
        elif _php_empty(cmd):
            cmd = {}
        elif not isinstance(cmd, dict):
            raise RestError("INVALID_ARG_VALUE", "cmd must be an array of commands", 400)
        if len(cmd) > BATCH_LIMIT:
            raise RestError("ERROR_BATCH_LENGTH_EXCEEDED", "Max batch length exceeded", 400)
        halt = _truthy(params.get("halt", "0"))
        with self._lock:
            self.stats["batches"] += 1
        results: dict[str, Any] = {}
        errors: dict[str, Any] = {}
        times: dict[str, Any] = {}
        for key, command in cmd.items():
            started = time.time()
            try:
                results[key] = self._batch_command(command, params.get("auth"))
                times[key] = time_block(started, time.time())
            except RestError as exc:
                errors[key] = exc.body()
                if halt:
                    break

        # PHP's json_encode writes an empty array as [], and Bitrix24 batches show it.
        def shaped(part: dict[str, Any]) -> dict[str, Any] | list[Any]:
            return [] if self.php_empty_arrays and not part else part

        return {
            "result": shaped(results),
            "result_error": shaped(errors),
            "result_total": shaped({}),
            "result_next": shaped({}),
            "result_time": shaped(times),
        }

    def _batch_command(self, command: Any, auth: Any) -> Any:
        if not isinstance(command, str):
            raise RestError("INVALID_ARG_VALUE", "A batch command must be a string", 400)
        name, _, query = command.partition("?")
        name = name.strip().strip("/").lower()
        name = name.removesuffix(".json")
        with self._lock:
            self.stats["methods"][name] += 1
            injection = self._take_injection_locked(name, top_level=False)
            blocked = self._method_block_locked(name)
        if name == "batch":
            raise RestError(
                "ERROR_BATCH_METHOD_NOT_ALLOWED", "Method is not allowed for batch usage", 400
            )
        if injection is not None:
            raise injection.answer()
        if blocked is not None:
            raise blocked
        params = php_form_decode(parse_qsl(query, keep_blank_values=True))
        # Commands run with the batch's own auth, whatever they carry.
        params["auth"] = auth
        return self._call(name, params)

    def _call(self, method: str, params: Mapping[str, Any]) -> Any:
        handlers: dict[str, Callable[[dict[str, Any]], Any]] = {
            "messageservice.sender.add": self._sender_add,
            "messageservice.sender.update": self._sender_update,
            "messageservice.sender.delete": self._sender_delete,
            "messageservice.sender.list": self._sender_list,
            "messageservice.message.status.update": self._status_update,
            "event.bind": self.events.bind,
            "event.get": self.events.get,
            "event.unbind": self.events.unbind,
        }
        if method.startswith("event."):
            # event.* keep their parameter names (event-bind.md writes them in lower case).
            if method in handlers:
                return handlers[method](dict(params))
            raise _method_not_found()
        if method in handlers:
            return handlers[method](_messageservice_params(params))
        if method == "app.info":
            return self._app_info()
        if method == "user.admin":
            # Any user may ask; the answer is whether they may manage the app (user-admin.md).
            return self.users.owner(params.get("auth")).admin
        if method == "profile":
            user = self.users.owner(params.get("auth"))
            return {
                "ID": str(user.id),
                "ADMIN": user.admin,
                "NAME": "Emulated",
                "LAST_NAME": "Administrator" if user.admin else "User",
                "PERSONAL_GENDER": "",
                "PERSONAL_PHOTO": "",
                "TIME_ZONE": "",
                "TIME_ZONE_OFFSET": 0,
            }
        if method == "scope":
            return SCOPE.split(",")
        raise _method_not_found()

    def _app_info(self) -> dict[str, Any]:
        return {
            "ID": 1,
            "CODE": self.emulator.client_id,
            "VERSION": self.app_version,
            "STATUS": self.app_status,
            "INSTALLED": self.install_finished,
            "PAYMENT_EXPIRED": "Y" if self.payment_expired else "N",
            "DAYS": -3 if self.payment_expired else None,
            "LANGUAGE_ID": "en",
            "LICENSE": "en_project",
            "LICENSE_TYPE": "project",
            "LICENSE_FAMILY": "project",
        }

    # -- messageservice methods (params already upper-cased) -------------------------------------

    def _sender_add(self, params: dict[str, Any]) -> bool:
        if not params:
            raise _validation("Empty data!")
        code = _check_code(params.get("CODE"))
        if _php_empty(params.get("NAME")):
            raise _validation("Empty sender NAME!")
        if _php_empty(params.get("TYPE")):
            raise _validation("Empty sender message TYPE!")
        if params["TYPE"] != "SMS":
            raise _validation("Unknown sender message TYPE!")
        handler = _check_handler(params.get("HANDLER"))
        with self._lock:
            if code in self.senders:
                raise RestError("ERROR_SENDER_ALREADY_INSTALLED", "Sender already installed!", 400)
            self.senders[code] = {
                "CODE": code,
                "TYPE": "SMS",
                "HANDLER": handler,
                "NAME": params["NAME"],
                "DESCRIPTION": params.get("DESCRIPTION") or "",
            }
        return True

    def _sender_update(self, params: dict[str, Any]) -> bool:
        if not self.supports_sender_update:
            raise _method_not_found()
        code = params.get("CODE")
        if _php_empty(code):
            raise RestError("ERROR_SENDER_CODE_REQUIRED", "CODE is required!", 400)
        changes = {
            key: params[key]
            for key in ("HANDLER", "NAME", "DESCRIPTION")
            if params.get(key) is not None
        }
        if not changes:
            raise RestError(
                "ERROR_SENDER_OTHER_PARAMS_REQUIRED",
                "At least one other parameter is required!",
                400,
            )
        if "HANDLER" in changes:
            changes["HANDLER"] = _check_handler(changes["HANDLER"])
        with self._lock:
            if code not in self.senders:
                raise RestError("ERROR_SENDER_NOT_FOUND", "Sender not found!", 400)
            self.senders[code] = {**self.senders[code], **changes}
        return True

    def _sender_delete(self, params: dict[str, Any]) -> bool:
        code = _check_code(params.get("CODE"))
        with self._lock:
            if self.senders.pop(code, None) is None:
                raise RestError("ERROR_SENDER_NOT_FOUND", "Sender not found!", 400)
        return True

    def _sender_list(self, params: dict[str, Any]) -> list[str]:
        with self._lock:
            return list(self.senders)

    def _status_update(self, params: dict[str, Any]) -> bool:
        with self._lock:
            self.stats["status_updates"] += 1
        code = _check_code(params.get("CODE"))
        status = params.get("STATUS")
        if status not in MESSAGE_STATUSES:
            raise RestError("ERROR_MESSAGE_STATUS_INCORRECT", "Message status incorrect!", 400)
        message_id = params.get("MESSAGE_ID")
        with self._lock:
            message = self.messages.get(message_id) if isinstance(message_id, str) else None
            if message is None or message["code"] != code:
                raise RestError("ERROR_MESSAGE_NOT_FOUND", "Message not found!", 400)
            message["statuses"].append({"status": status, "at": time.time()})
        return True

    # -- what Bitrix24 sends to the app ----------------------------------------------------------

    def _require_app(self) -> str:
        if self.app_url is None:
            raise RuntimeError("no app yet: call install(app_url) first")
        return self.app_url

    def _post(
        self, url: str, fields: Mapping[str, str], params: Mapping[str, str] | None = None
    ) -> requests.Response:
        return requests.post(
            url,
            data=list(fields.items()),
            params=params,
            headers={"User-Agent": USER_AGENT},
            timeout=HTTP_TIMEOUT,
        )

    def _auth_block_locked(self) -> dict[str, str]:
        """The ``auth[...]`` of an install/update event, which carries the refresh token."""
        return {
            "auth[access_token]": self.access_token,
            "auth[expires]": str(int(self.access_expires_at)),
            "auth[expires_in]": str(int(self.emulator.token_ttl)),
            "auth[scope]": SCOPE,
            "auth[domain]": self.domain,
            "auth[server_endpoint]": self.emulator.server_endpoint,
            "auth[status]": "L",
            "auth[client_endpoint]": self.client_endpoint,
            "auth[member_id]": self.member_id,
            "auth[user_id]": "1",
            "auth[refresh_token]": self.refresh_token,
            "auth[application_token]": self.application_token,
        }

    def _app_event_locked(self, event: str, data: Mapping[str, Any]) -> dict[str, str]:
        fields = {"event": event}
        fields.update({f"data[{key}]": str(value) for key, value in data.items()})
        fields["ts"] = str(int(time.time()))
        fields.update(self._auth_block_locked())
        return fields

    def install(self, app_url: str, mode: str = "event") -> requests.Response:
        """Install the app from ``app_url``: new tokens and application_token, then tell the app.

        ``mode="event"`` POSTs ONAPPINSTALL to ``{app_url}/bitrix24/install``; ``mode="ui"`` POSTs
        the install frame's form there, with ``DOMAIN``, ``PROTOCOL=0``, ``LANG`` and ``APP_SID``
        in the query (PROTOCOL 0: the app must use ``http://{DOMAIN}/rest/``). A re-install keeps
        ``member_id``; tokens issued earlier stay valid until they expire or are spent.

        :returns: the app's response. Network errors propagate (the portal state has changed).
        """
        if mode not in ("event", "ui"):
            raise ValueError(f"mode must be 'event' or 'ui', not {mode!r}")
        app_url = app_url.rstrip("/")
        with self._lock:
            self.app_url = app_url
            self.application_token = token_hex(16)
            self.installed = True
            self.install_finished = mode == "event"
            self._issue_pair_locked()
            if mode == "event":
                fields = self._app_event_locked(
                    "ONAPPINSTALL",
                    {
                        "VERSION": self.app_version,
                        "ACTIVE": "Y",
                        "INSTALLED": "Y",
                        "LANGUAGE_ID": "en",
                    },
                )
                query = None
            else:
                fields = {
                    "AUTH_ID": self.access_token,
                    "AUTH_EXPIRES": str(int(self.emulator.token_ttl)),
                    "REFRESH_ID": self.refresh_token,
                    "SERVER_ENDPOINT": self.emulator.server_endpoint,
                    "APPLICATION_TOKEN": self.application_token,
                    "APPLICATION_SCOPE": SCOPE,
                    "member_id": self.member_id,
                    "status": "L",
                    "PLACEMENT": "DEFAULT",
                    "PLACEMENT_OPTIONS": "{}",
                }
                query = {
                    "DOMAIN": self.domain,
                    "PROTOCOL": "0",
                    "LANG": "en",
                    "APP_SID": token_hex(16),
                }
        response = self._post(f"{app_url}/bitrix24/install", fields, query)
        if mode == "ui":
            # Without a browser, a page that would call BX24.installFinish() is the best signal.
            with self._lock:
                self.install_finished = "installFinish" in response.text
        return response

    def _deliver(self, handlers: list[str], fields: Mapping[str, str]) -> requests.Response | None:
        """POST an event to every handler bound for it; the first handler's answer, or None when
        the app bound none (then Bitrix24 sends nothing: api-reference/events/index.md)."""
        responses = [self._post(url, fields) for url in handlers]
        return responses[0] if responses else None

    def update_app(self, version: int = 2) -> requests.Response | None:
        """Update the app to ``version``: the app's event handlers are removed (event-bind.md:
        "When an application is deleted or updated, its actions will be removed", which we read
        as covering the handlers that page binds), its
        senders too while :attr:`update_deletes_senders`, then ONAPPUPDATE (``data`` with
        ``VERSION``, ``PREVIOUS_VERSION``, ``LANGUAGE_ID``; ``auth`` with a fresh token pair)
        goes to the handlers that were bound for it before the update.

        The docs do not say in which order removal and delivery happen; delivering to the
        handlers bound before the update is the only order in which an app can learn of it.

        The event carries a new ``application_token`` ("the updated ``application_token``",
        b24restdocs ``api-reference/common/events/on-app-update.md``); later events and HANDLER
        calls carry the new one.

        :returns: the first bound handler's answer; None when no ONAPPUPDATE handler was bound.
        """
        with self._lock:
            self._require_app()
            handlers = self.events.handlers("ONAPPUPDATE")
            self.events.clear()
            if self.update_deletes_senders:
                self.senders.clear()
            previous, self.app_version = self.app_version, version
            self.application_token = token_hex(16)
            self._issue_pair_locked()
            fields = self._app_event_locked(
                "ONAPPUPDATE",
                # data holds these three only (api-reference/common/events/on-app-update.md)
                {"VERSION": version, "PREVIOUS_VERSION": previous, "LANGUAGE_ID": "en"},
            )
        return self._deliver(handlers, fields)

    def uninstall(self, clean: bool = False) -> requests.Response | None:
        """Uninstall the app: event handlers removed, every token invalid, then ONAPPUNINSTALL
        goes to the handlers bound for it, with ``data[CLEAN]`` = 1 when ``clean``
        (settings/app-uninstallation.md). That page lists what an uninstall deletes and SMS
        providers are not among them: the senders go only while
        :attr:`uninstall_deletes_senders` (default True, the tidier guess; tests set False to
        play the page's silence literally).

        :returns: the first bound handler's answer; None when no ONAPPUNINSTALL handler was bound.
        """
        with self._lock:
            self._require_app()
            handlers = self.events.handlers("ONAPPUNINSTALL")
            self.events.clear()
            if self.uninstall_deletes_senders:
                self.senders.clear()
            self._access.clear()
            self._refresh.clear()
            self.installed = False
            self.install_finished = False
            fields = {
                "event": "ONAPPUNINSTALL",
                "data[LANGUAGE_ID]": "en",
                "data[CLEAN]": "1" if clean else "0",
                "ts": str(int(time.time())),
                "auth[domain]": self.domain,
                "auth[server_endpoint]": self.emulator.server_endpoint,
                "auth[client_endpoint]": self.client_endpoint,
                "auth[member_id]": self.member_id,
                "auth[application_token]": self.application_token,
            }
        return self._deliver(handlers, fields)

    def pay(self, status: str = "P", days: int = 30) -> requests.Response | None:
        """The app was paid for: ONAPPPAYMENT (on-app-payment.md) to the handlers bound for it;
        ``payment_expired`` and ``payment_required`` are cleared.

        :returns: the first bound handler's answer; None when no ONAPPPAYMENT handler was bound.
        """
        with self._lock:
            self.app_status = status
            self.payment_expired = self.payment_required = False
            handlers = self.events.handlers("ONAPPPAYMENT")
            fields = {
                "event": "ONAPPPAYMENT",
                "data[CODE]": self.emulator.client_id,
                "data[VERSION]": str(self.app_version),
                "data[STATUS]": status,
                "data[PAYMENT_EXPIRED]": "N",
                "data[DAYS]": str(days),
                "data[LANGUAGE_ID]": "en",
                "ts": str(int(time.time())),
                "auth[domain]": self.domain,
                "auth[server_endpoint]": self.emulator.server_endpoint,
                "auth[client_endpoint]": self.client_endpoint,
                "auth[member_id]": self.member_id,
            }
        return self._deliver(handlers, fields)

    def send_sms(
        self,
        code: str,
        to: str,
        body: str,
        module_id: str = "crm",
        with_auth: bool = True,
        message_id: str | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> tuple[str, requests.Response]:
        """Send a message through sender ``code`` the way Bitrix24 calls a HANDLER.

        The message is recorded in ``messages`` first, so status updates can find it.

        :param module_id: ``crm`` (adds ``bindings[0][…]``) or ``bizproc`` (adds ``workflow_id``,
            ``document_id[…]``, ``document_type[…]``).
        :param with_auth: add the ``auth[…]`` block (no refresh token), as for a message with an
            author; Bitrix24 leaves it out for some automated messages.
        :param extra: raw form fields to add or override; a value of None removes a field.
        :returns: ``(message_id, the handler's response)``.
        :raises KeyError: when no sender ``code`` is registered.
        """
        with self._lock:
            handler = self.senders[code]["HANDLER"]
            message_id = message_id or token_hex(16)
            record = self.messages.setdefault(message_id, {"statuses": []})
            record.update(code=code, to=to, body=body, module_id=module_id, sent_at=time.time())
            fields: dict[str, Any] = {
                "type": "SMS",
                "code": code,
                "message_id": message_id,
                "message_to": to,
                "message_body": body,
                "ts": str(int(time.time())),
                "module_id": module_id,
            }
            if module_id == "crm":
                fields["bindings[0][OWNER_TYPE_ID]"] = "3"
                fields["bindings[0][OWNER_ID]"] = str(next(self._owner_ids))
            elif module_id == "bizproc":
                fields["workflow_id"] = f"{token_hex(7)}.{int(time.time() * 1e6) % 10**8}"
                fields["document_id[0]"] = "crm"
                fields["document_id[1]"] = "CCrmDocumentContact"
                fields["document_id[2]"] = "CONTACT_1"
                fields["document_type[0]"] = "crm"
                fields["document_type[1]"] = "CCrmDocumentContact"
                fields["document_type[2]"] = "CONTACT"
            fields["properties[phone_number]"] = to
            fields["properties[message_text]"] = body
            if with_auth:
                auth = self._auth_block_locked()
                del auth["auth[refresh_token]"]
                fields.update(auth)
        for key, value in (extra or {}).items():
            if value is None:
                fields.pop(key, None)
            else:
                fields[key] = str(value)
        return message_id, self._post(handler, fields)

    # -- inspection helpers ----------------------------------------------------------------------

    def final_status(self, message_id: str) -> str | None:
        """The last status reported for ``message_id``, or None."""
        with self._lock:
            statuses = self.messages.get(message_id, {}).get("statuses") or []
            return statuses[-1]["status"] if statuses else None

    def wait_for_status(
        self,
        message_id: str,
        statuses: Collection[str] = FINAL_STATUSES,
        timeout: float = 10.0,
    ) -> str:
        """Poll until the last reported status of ``message_id`` is one of ``statuses``.

        :returns: that status.
        :raises TimeoutError: naming the statuses seen so far.
        """
        deadline = time.monotonic() + timeout
        while True:
            status = self.final_status(message_id)
            if status is not None and status in statuses:
                return status
            if time.monotonic() >= deadline:
                with self._lock:
                    seen = [
                        s["status"] for s in self.messages.get(message_id, {}).get("statuses", [])
                    ]
                raise TimeoutError(
                    f"message {message_id}: no status in {sorted(statuses)} after {timeout}s; "
                    f"seen {seen}"
                )
            time.sleep(0.02)

    def serve_page(self, html: str) -> str:
        """Serve ``html`` as a page of this portal's own UI (its domain, like the page around an
        app's frame on a real portal) and return its URL."""
        with self._lock:
            path = f"/page/{len(self.pages)}"
            self.pages[path] = html
        return f"{self.base_url}{path}"

    def placement_auth(self) -> dict[str, str]:
        """The form an app page opened in a Bitrix24 frame receives (query fields included).

        A still-valid current pair is reused; otherwise a new one is issued, as opening a frame
        would do.
        """
        with self._lock:
            if not self.installed:
                raise RuntimeError("the app is not installed on this portal")
            if self._access.get(self.access_token, 0.0) <= time.time():
                self._issue_pair_locked()
            return {
                "AUTH_ID": self.access_token,
                "AUTH_EXPIRES": str(max(0, int(self.access_expires_at - time.time()))),
                "REFRESH_ID": self.refresh_token,
                "member_id": self.member_id,
                "status": "L",
                "PLACEMENT": "DEFAULT",
                "PLACEMENT_OPTIONS": "{}",
                "DOMAIN": self.domain,
                "PROTOCOL": "0",
                "LANG": "en",
                "APP_SID": token_hex(16),
            }

    def user_auth(self, admin: bool = False) -> dict[str, str]:
        """The frame form (as :meth:`placement_auth`) of a new user of the portal, with a pair of
        their own: valid for REST calls like the installer's, but ``user.admin`` and
        ``profile``'s ``ADMIN`` answer ``admin`` for it. Every user who opens the app can read
        these tokens in the frame (``BX24.getAuth()``, bx24-get-auth.md).
        """
        with self._lock:
            if not self.installed:
                raise RuntimeError("the app is not installed on this portal")
            access, refresh, expires_at = self._issue_user_pair_locked(self.users.add(admin))
            form = self.placement_auth()
        form["AUTH_ID"], form["REFRESH_ID"] = access, refresh
        form["AUTH_EXPIRES"] = str(max(0, int(expires_at - time.time())))
        return form

    def stats_snapshot(self) -> dict[str, Any]:
        """A consistent copy of ``stats`` (``methods`` copied too)."""
        with self._lock:
            snapshot = dict(self.stats)
            snapshot["methods"] = Counter(self.stats["methods"])
            return snapshot
