"""What Bitrix24 posts to us: PHP bracket-style forms, and the schemas they must pass.

Bitrix24 sends ``auth[member_id]=…&bindings[0][OWNER_ID]=…``; :func:`parse_bracketed` turns the
pairs into nested dicts the way PHP does (numeric keys stay dict keys; order is kept). The schemas
validate the HANDLER call and the install / event payloads, naming the field that is wrong.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from typing import Any, ClassVar
from urllib.parse import unquote

from marshmallow import EXCLUDE, Schema, ValidationError, fields, validate, validates_schema

#: what the HANDLER's fields must look like (the schema and the fast path share them)
CODE_PATTERN = re.compile(r"^[a-zA-Z0-9._-]{1,64}$")
MESSAGE_ID_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
MAX_NUMBER = 64
MAX_BODY = 65536
MAX_MODULE_ID = 32
MAX_MEMBER_ID = 64
MAX_APPLICATION_TOKEN = 255

_KEY_RE = re.compile(r"^([^\[\]]+)((?:\[[^\[\]]*\])*)$")
_PART_RE = re.compile(r"\[([^\[\]]*)\]")
MAX_DEPTH = 5


class PayloadError(ValueError):
    """The body could not be read as a Bitrix24 form; ``field`` names the offending key."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def parse_bracketed(pairs: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """Nest ``a[b][c]=v`` pairs into ``{"a": {"b": {"c": v}}}``.

    ``a[]=x`` appends with the next free integer key. A key that is given twice keeps its last
    value (as PHP does); a key used both as a value and as a table is an error.
    """
    result: dict[str, Any] = {}
    for raw_key, value in pairs:
        if "[" not in raw_key and "]" not in raw_key and raw_key:
            # A plain key (half of a HANDLER call's): no parsing to do.
            if isinstance(result.get(raw_key), dict):
                raise PayloadError(raw_key, f"{raw_key!r} is both a value and a table")
            result[raw_key] = value
            continue
        parts = _key_parts(raw_key)
        if len(parts) > MAX_DEPTH:
            raise PayloadError(raw_key, f"key {raw_key!r} is nested too deeply")
        node = result
        for i, part in enumerate(parts[:-1]):
            if part == "":
                part = str(_next_index(node))
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise PayloadError(
                    raw_key, f"{'.'.join(parts[: i + 1])} is both a value and a table"
                )
            node = child
        last = parts[-1]
        if last == "":
            last = str(_next_index(node))
        if isinstance(node.get(last), dict):
            raise PayloadError(raw_key, f"{raw_key!r} is both a value and a table")
        node[last] = value
    return result


@functools.lru_cache(maxsize=1024)
def _key_parts(raw_key: str) -> tuple[str, ...]:
    """``a[b][c]`` → ``("a", "b", "c")``; raises PayloadError for a malformed key.

    Cached: every call of one kind sends the same few dozen keys (a key that does not parse
    raises, and is not kept)."""
    # One level (``auth[member_id]``: most bracketed keys Bitrix24 sends) without the regexes.
    opening = raw_key.find("[")
    if opening > 0 and raw_key[-1] == "]":
        inner = raw_key[opening + 1 : -1]
        if "[" not in inner and "]" not in inner and "]" not in raw_key[:opening]:
            return (raw_key[:opening], inner)
    match = _KEY_RE.match(raw_key)
    if not match:
        raise PayloadError(raw_key, f"malformed key {raw_key!r}")
    return (match.group(1), *_PART_RE.findall(match.group(2)))


def parse_urlencoded(text: str) -> list[tuple[str, str]]:
    """The pairs of an ``application/x-www-form-urlencoded`` body, as
    ``urllib.parse.parse_qsl(text, keep_blank_values=True)`` gives them, at half its cost:
    most names and many values need no unquoting, and are not passed through it."""
    pairs = []
    for field in text.split("&"):
        if not field:
            continue
        name, _, value = field.partition("=")
        if "%" in name or "+" in name:
            name = _unquote_name(name)
        if "+" in value:
            value = value.replace("+", " ")
        if "%" in value:
            value = unquote(value)
        pairs.append((name, value))
    return pairs


@functools.lru_cache(maxsize=1024)
def _unquote_name(name: str) -> str:
    """A field name, unquoted: cached, since each call of one kind sends the same names
    (``auth%5Bmember_id%5D`` …), while its values differ."""
    return unquote(name.replace("+", " "))


def _next_index(node: dict[str, Any]) -> int:
    numbers = [int(k) for k in node if k.isdigit()]
    return max(numbers) + 1 if numbers else 0


class _Text(fields.String):
    """A string field that refuses tables where a single value belongs."""

    default_error_messages: ClassVar[dict[str, str]] = {"invalid": "must be a single text value"}


class AuthSchema(Schema):
    """``auth[…]`` of events and handler calls; the keys Bitrix24 sends vary, extras are ignored."""

    class Meta:
        unknown = EXCLUDE

    access_token = _Text()
    refresh_token = _Text()
    expires = _Text()
    expires_in = _Text()
    scope = _Text()
    domain = _Text()
    server_endpoint = _Text()
    client_endpoint = _Text()
    status = _Text()
    member_id = _Text(validate=validate.Length(min=1, max=64))
    user_id = _Text()
    application_token = _Text(validate=validate.Length(min=1, max=255))


class HandlerAuthSchema(Schema):
    """``auth[…]`` of a HANDLER call: only what the call is checked against (the portal and
    its application_token); the tokens beside them are not ours to keep, so not read."""

    class Meta:
        unknown = EXCLUDE

    member_id = _Text(validate=validate.Length(min=1, max=MAX_MEMBER_ID))
    application_token = _Text(validate=validate.Length(min=1, max=MAX_APPLICATION_TOKEN))


class HandlerSchema(Schema):
    """The HANDLER call: one message for one provider CODE."""

    class Meta:
        unknown = EXCLUDE

    type = _Text(load_default="SMS", validate=validate.OneOf(["SMS"]))
    code = _Text(required=True, validate=validate.Regexp(CODE_PATTERN))
    message_id = _Text(required=True, validate=validate.Regexp(MESSAGE_ID_PATTERN))
    message_to = _Text(required=True, validate=validate.Length(min=1, max=MAX_NUMBER))
    message_body = _Text(required=True, validate=validate.Length(min=1, max=MAX_BODY))
    ts = _Text(load_default=None)
    module_id = _Text(load_default=None, validate=validate.Length(max=MAX_MODULE_ID))
    bindings = fields.Dict(load_default=None)
    workflow_id = _Text(load_default=None)
    document_id = fields.Raw(load_default=None)
    document_type = fields.Raw(load_default=None)
    # properties[…] repeats message_to and message_body: not read.
    auth = fields.Nested(HandlerAuthSchema, load_default=None)

    @validates_schema
    def check_bindings(self, data: dict[str, Any], **kwargs: Any) -> None:
        bindings = data.get("bindings")
        if bindings is None:
            return
        for index, binding in bindings.items():
            if not isinstance(binding, dict) or not all(
                isinstance(v, str) for v in binding.values()
            ):
                raise ValidationError("each binding must be a table of text values", "bindings")
            if not str(index).isdigit():
                raise ValidationError("binding keys must be numbers", "bindings")


def load_handler_call(payload: Any) -> dict[str, Any] | None:
    """What ``HandlerSchema().load(payload)`` returns, for a call it would accept without a
    second look, at a fifth of its cost; None when the schema must decide (every error, and
    anything unusual: a table or a number where text belongs, …).

    The busiest route's validation, so it is written out; ``tests/test_payloads.py`` checks it
    against the schema on generated payloads: it never accepts what the schema refuses, and
    what it accepts it loads as the schema does.
    """
    if type(payload) is not dict:
        return None
    get = payload.get
    code, message_id = get("code"), get("message_id")
    to, body = get("message_to"), get("message_body")
    if (
        type(code) is not str
        or type(message_id) is not str
        or type(to) is not str
        or type(body) is not str
        or not CODE_PATTERN.match(code)
        or not MESSAGE_ID_PATTERN.match(message_id)
        or not 0 < len(to) <= MAX_NUMBER
        or not 0 < len(body) <= MAX_BODY
    ):
        return None
    data: dict[str, Any] = {
        "code": code,
        "message_id": message_id,
        "message_to": to,
        "message_body": body,
        "type": "SMS",
        "ts": None,
        "module_id": None,
        "workflow_id": None,
        "bindings": None,
        "document_id": None,
        "document_type": None,
        "auth": None,
    }
    for key in ("type", "ts", "module_id", "workflow_id"):
        if key in payload:
            value = payload[key]
            if type(value) is not str:
                return None
            data[key] = value
    module_id = data["module_id"]
    if data["type"] != "SMS" or (module_id is not None and len(module_id) > MAX_MODULE_ID):
        return None
    for key in ("document_id", "document_type"):
        if key in payload:
            data[key] = payload[key]
    if "bindings" in payload:
        bindings = payload["bindings"]
        if type(bindings) is not dict:
            return None
        for index, binding in bindings.items():
            if type(binding) is not dict or not str(index).isdigit():
                return None
            if not all(type(v) is str for v in binding.values()):
                return None
        data["bindings"] = dict(bindings)
    if "auth" in payload:
        auth = payload["auth"]
        if type(auth) is not dict:
            return None
        loaded = {}
        for key, most in (
            ("member_id", MAX_MEMBER_ID),
            ("application_token", MAX_APPLICATION_TOKEN),
        ):
            if key in auth:
                value = auth[key]
                if type(value) is not str or not 0 < len(value) <= most:
                    return None
                loaded[key] = value
        data["auth"] = loaded
    return data


class EventSchema(Schema):
    """ONAPPINSTALL / ONAPPUPDATE / ONAPPUNINSTALL as posted to the event handler."""

    class Meta:
        unknown = EXCLUDE

    event = _Text(required=True, validate=validate.Length(min=1, max=64))
    data = fields.Dict(load_default=dict)
    ts = _Text(load_default=None)
    auth = fields.Nested(AuthSchema, required=True)


class InstallFormSchema(Schema):
    """The UI install form (the app's install page opened in a frame)."""

    class Meta:
        unknown = EXCLUDE

    AUTH_ID = _Text(required=True, validate=validate.Length(min=1, max=255))
    AUTH_EXPIRES = _Text(load_default="3600")
    REFRESH_ID = _Text(required=True, validate=validate.Length(min=1, max=255))
    SERVER_ENDPOINT = _Text(load_default=None)
    APPLICATION_TOKEN = _Text(required=True, validate=validate.Length(min=1, max=255))
    APPLICATION_SCOPE = _Text(load_default=None)
    member_id = _Text(required=True, validate=validate.Length(min=1, max=64))
    status = _Text(load_default=None)
    PLACEMENT = _Text(load_default=None)
    DOMAIN = _Text(required=True, validate=validate.Regexp(r"^[A-Za-z0-9.-]+(:\d{1,5})?$"))
    PROTOCOL = _Text(load_default="1", validate=validate.OneOf(["0", "1"]))
    LANG = _Text(load_default=None)
