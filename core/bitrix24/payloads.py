"""What Bitrix24 posts to us: PHP bracket-style forms, and the schemas they must pass.

Bitrix24 sends ``auth[member_id]=…&bindings[0][OWNER_ID]=…``; :func:`parse_bracketed` turns the
pairs into nested dicts the way PHP does (numeric keys stay dict keys; order is kept). The schemas
validate the HANDLER call and the install / event payloads, naming the field that is wrong.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import unquote

from marshmallow import EXCLUDE, Schema, fields, validate

#: what the HANDLER's fields must look like
CODE_PATTERN = re.compile(r"^[a-zA-Z0-9._-]{1,64}$")
MESSAGE_ID_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
MAX_NUMBER = 64
MAX_BODY = 65536
MAX_MODULE_ID = 32
MAX_MEMBER_ID = 64
MAX_APPLICATION_TOKEN = 255

_KEY_RE = re.compile(r"^([^\[\]]+)((?:\[[^\[\]]*\])*)$")
_PART_RE = re.compile(r"\[([^\[\]]*)\]")
#: levels of nesting at most: ``a[b][c][d][e]``, or five JSON objects / arrays inside each other
MAX_DEPTH = 5
#: fields of one body at most (a HANDLER call sends about twenty, an install about thirty)
MAX_FIELDS = 1000
#: items of one table or JSON array at most
MAX_ITEMS = 1000
#: characters of a field name quoted in an error answer
_NAME_SHOWN = 80
#: what no stored text may hold: NUL (PostgreSQL refuses it) and lone surrogates (not Unicode:
#: SQLite would store bytes it cannot read back)
_BAD_TEXT = re.compile("[\x00\ud800-\udfff]")


def _shown(name: str) -> str:
    """A field name as an error answer quotes it: hostile names can be 256 KB long."""
    return name if len(name) <= _NAME_SHOWN else name[: _NAME_SHOWN - 1] + "…"


class PayloadError(ValueError):
    """The body could not be read as a Bitrix24 form; ``field`` names the offending key."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = _shown(field)


def parse_bracketed(pairs: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """Nest ``a[b][c]=v`` pairs into ``{"a": {"b": {"c": v}}}``.

    ``a[]=x`` appends with the next free integer key. A key that is given twice keeps its last
    value (as PHP does); a key used both as a value and as a table is an error. Linear in the
    number of pairs (each table remembers its next free index), at most :data:`MAX_FIELDS`
    pairs, :data:`MAX_DEPTH` levels and :data:`MAX_ITEMS` entries per table.
    """
    result: dict[str, Any] = {}
    #: id(table) -> its next free integer key (tables live as long as ``result``)
    free: dict[int, int] = {}
    for count, (raw_key, value) in enumerate(pairs, 1):
        if count > MAX_FIELDS:
            raise PayloadError(raw_key, f"more than {MAX_FIELDS} fields")
        if "[" not in raw_key and "]" not in raw_key and raw_key:
            # A plain key (half of a HANDLER call's): no parsing to do.
            if isinstance(result.get(raw_key), dict):
                raise PayloadError(raw_key, "is both a value and a table")
            result[raw_key] = value
            continue
        # (Counted first: a hostile key of 100,000 levels is refused before it is split.)
        if raw_key.count("[") > MAX_DEPTH or len(parts := _key_parts(raw_key)) > MAX_DEPTH:
            raise PayloadError(raw_key, "is nested too deeply")
        node = result
        for i, part in enumerate(parts[:-1]):
            part = _slot(node, part, free, raw_key)
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise PayloadError(
                    raw_key, f"{_shown('.'.join(parts[: i + 1]))} is both a value and a table"
                )
            node = child
        last = _slot(node, parts[-1], free, raw_key)
        if isinstance(node.get(last), dict):
            raise PayloadError(raw_key, "is both a value and a table")
        node[last] = value
    return result


def _slot(node: dict[str, Any], part: str, free: dict[int, int], raw_key: str) -> str:
    """The key ``part`` names in ``node`` (``""``: the next free integer), noting integers."""
    if part == "":
        part = str(free.get(id(node), 0))
    if part in node:
        return part
    if len(node) >= MAX_ITEMS:
        raise PayloadError(raw_key, f"more than {MAX_ITEMS} entries in one table")
    # (int() refuses numbers of more than 4,300 digits: such a key is a name, not an index.)
    if part.isdecimal() and len(part) <= 18:
        free[id(node)] = max(free.get(id(node), 0), int(part) + 1)
    return part


def parse_json(text: str) -> Any:
    """A JSON body, in time linear in its length.

    The decoder refuses nesting deeper than the interpreter's recursion limit by raising
    RecursionError (a body nested 50,000 deep costs a thousand levels, then is refused); the
    caps on depth (:data:`MAX_DEPTH`), entries (:data:`MAX_ITEMS`) and values
    (:data:`MAX_FIELDS`) are then checked by :func:`check_text`.

    :raises PayloadError: ``field`` "body" for what is not JSON or is nested too deeply.
    """
    try:
        return json.loads(text)
    except RecursionError:
        raise PayloadError("body", f"nested more than {MAX_DEPTH} levels deep") from None
    except ValueError:
        raise PayloadError("body", "not valid JSON") from None


def check_text(payload: Any) -> None:
    """Every key and text value of a read body: no NUL, no lone surrogate, within the caps.

    :raises PayloadError: naming the first field (``auth[member_id]``) that breaks a rule.
    """
    budget = [MAX_FIELDS]
    _check_node(payload, "", 0, budget)


def _check_node(node: Any, name: str, depth: int, budget: list[int]) -> None:
    budget[0] -= 1
    if budget[0] < 0:
        raise PayloadError(name or "body", f"more than {MAX_FIELDS} fields")
    if isinstance(node, str):
        if _BAD_TEXT.search(node):
            raise PayloadError(name or "body", "holds a NUL character or is not valid Unicode")
        return
    if isinstance(node, dict | list):
        if depth >= MAX_DEPTH:
            raise PayloadError(name or "body", f"nested more than {MAX_DEPTH} levels deep")
        if len(node) > MAX_ITEMS:
            raise PayloadError(name or "body", f"more than {MAX_ITEMS} entries")
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, value in items:
            key = str(key)
            if _BAD_TEXT.search(key):
                raise PayloadError(
                    repr(key), "a field name holds a NUL character or is not valid Unicode"
                )
            _check_node(value, f"{name}[{key}]" if name else key, depth + 1, budget)


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
        raise PayloadError(raw_key, "malformed key")
    return (match.group(1), *_PART_RE.findall(match.group(2)))


def parse_urlencoded(text: str) -> list[tuple[str, str]]:
    """The pairs of an ``application/x-www-form-urlencoded`` body, as
    ``urllib.parse.parse_qsl(text, keep_blank_values=True)`` gives them, at half its cost:
    most names and many values need no unquoting, and are not passed through it."""
    if text.count("&") >= MAX_FIELDS:
        # Counted before anything is split: a hostile body costs one pass over its bytes.
        raise PayloadError("body", f"more than {MAX_FIELDS} fields")
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


class _Text(fields.String):
    """A string field that refuses tables where a single value belongs."""

    # marshmallow merges this with the base class's messages (instance attribute there)
    default_error_messages: dict[str, str | list[Any] | dict[Any, Any]] = {
        "invalid": "must be a single text value"
    }


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


class FieldError(PayloadError):
    """A HANDLER field is missing or wrong; ``field`` names it the way the form does."""


_MISSING: Any = object()


def _text(
    payload: Mapping[str, Any],
    name: str,
    *,
    required: bool = False,
    nullable: bool = False,
    most: int | None = None,
    least: int = 0,
    pattern: re.Pattern[str] | None = None,
    field: str | None = None,
) -> Any:
    """One text field: the value, ``_MISSING`` when absent and optional, or FieldError."""
    field = field or name
    value = payload.get(name, _MISSING)
    if value is _MISSING:
        if required:
            raise FieldError(field, "missing")
        return _MISSING
    if value is None:
        if nullable:
            return None
        raise FieldError(field, "may not be empty")
    if not isinstance(value, str):
        raise FieldError(field, "must be a single text value")
    if pattern is not None and not pattern.match(value):
        raise FieldError(field, "is not in the expected format")
    if not least <= len(value) <= (most if most is not None else len(value)):
        raise FieldError(field, f"must be {least} to {most} characters long")
    return value


def _bindings(value: Any) -> dict[str, Any] | None:
    """``bindings[N][KEY]=text``: a table of numbered tables of text."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise FieldError("bindings", "must be a table")
    for index, binding in value.items():
        if not isinstance(binding, dict) or not all(isinstance(v, str) for v in binding.values()):
            raise FieldError("bindings", "each binding must be a table of text values")
        if not str(index).isdigit():
            raise FieldError("bindings", "binding keys must be numbers")
    return dict(value)


def _handler_auth(value: Any) -> dict[str, str] | None:
    """``auth[…]`` of a HANDLER call: only what the call is checked against (the portal and
    its application_token); the tokens beside them are not ours to keep, so not read."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise FieldError("auth", "must be a table")
    loaded = {}
    for name, most in (("member_id", MAX_MEMBER_ID), ("application_token", MAX_APPLICATION_TOKEN)):
        text = _text(value, name, least=1, most=most, field=f"auth[{name}]")
        if text is not _MISSING:
            loaded[name] = text
    return loaded


def load_handler_call(payload: Mapping[str, Any]) -> dict[str, Any]:
    """The HANDLER call (one message for one provider CODE), checked and loaded.

    The fields Bitrix24 documents for a provider's handler (``code``, ``message_id``,
    ``message_to``, ``message_body`` required; ``type`` SMS; context fields optional);
    ``properties[…]`` repeats ``message_to`` and ``message_body`` and is not read, nor is any
    other key. Every field is in the result (None when absent), ``auth`` holding only
    ``member_id`` and ``application_token``.

    Written out rather than a marshmallow schema: it is the busiest route's validation
    (``tests/test_payloads.py`` checks it against the schema it replaced, on generated payloads).

    :raises FieldError: naming the first field that is missing or wrong.
    """
    code = _text(payload, "code", required=True, pattern=CODE_PATTERN)
    message_id = _text(payload, "message_id", required=True, pattern=MESSAGE_ID_PATTERN)
    to = _text(payload, "message_to", required=True, least=1, most=MAX_NUMBER)
    body = _text(payload, "message_body", required=True, least=1, most=MAX_BODY)
    kind = _text(payload, "type")
    if kind is not _MISSING and kind != "SMS":
        raise FieldError("type", "must be SMS")
    optional = {
        name: _text(payload, name, nullable=True, most=most)
        for name, most in (("ts", None), ("module_id", MAX_MODULE_ID), ("workflow_id", None))
    }
    return {
        "code": code,
        "message_id": message_id,
        "message_to": to,
        "message_body": body,
        "type": "SMS",
        **{name: None if value is _MISSING else value for name, value in optional.items()},
        "bindings": _bindings(payload.get("bindings")),
        "document_id": payload.get("document_id"),
        "document_type": payload.get("document_type"),
        "auth": _handler_auth(payload.get("auth")),
    }


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
