"""What Bitrix24 posts to us: PHP bracket-style forms, and the schemas they must pass.

Bitrix24 sends ``auth[member_id]=…&bindings[0][OWNER_ID]=…``; :func:`parse_bracketed` turns the
pairs into nested dicts the way PHP does (numeric keys stay dict keys; order is kept). The schemas
validate the HANDLER call and the install / event payloads, naming the field that is wrong.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, ClassVar

from marshmallow import EXCLUDE, Schema, ValidationError, fields, validate, validates_schema

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
        match = _KEY_RE.match(raw_key)
        if not match:
            raise PayloadError(raw_key, f"malformed key {raw_key!r}")
        parts = [match.group(1), *_PART_RE.findall(match.group(2))]
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
                raise PayloadError(raw_key, f"{'.'.join(parts[: i + 1])} is both a value and a table")
            node = child
        last = parts[-1]
        if last == "":
            last = str(_next_index(node))
        if isinstance(node.get(last), dict):
            raise PayloadError(raw_key, f"{raw_key!r} is both a value and a table")
        node[last] = value
    return result


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

    member_id = _Text(validate=validate.Length(min=1, max=64))
    application_token = _Text(validate=validate.Length(min=1, max=255))


class HandlerSchema(Schema):
    """The HANDLER call: one message for one provider CODE."""

    class Meta:
        unknown = EXCLUDE

    type = _Text(load_default="SMS", validate=validate.OneOf(["SMS"]))
    code = _Text(required=True, validate=validate.Regexp(r"^[a-zA-Z0-9._-]{1,64}$"))
    message_id = _Text(required=True, validate=validate.Regexp(r"^[A-Za-z0-9_.-]{1,64}$"))
    message_to = _Text(required=True, validate=validate.Length(min=1, max=64))
    message_body = _Text(required=True, validate=validate.Length(min=1, max=65536))
    ts = _Text(load_default=None)
    module_id = _Text(load_default=None, validate=validate.Length(max=32))
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

