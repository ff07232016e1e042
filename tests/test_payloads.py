"""The HANDLER's fast readers agree with the general ones they stand in for."""

from __future__ import annotations

from collections import Counter
from urllib.parse import parse_qsl, urlencode

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from marshmallow import EXCLUDE, Schema, ValidationError, fields, validate, validates_schema

from b24sms.bitrix24.payloads import (
    _KEY_RE,
    _PART_RE,
    CODE_PATTERN,
    MAX_APPLICATION_TOKEN,
    MAX_BODY,
    MAX_MEMBER_ID,
    MAX_MODULE_ID,
    MAX_NUMBER,
    MESSAGE_ID_PATTERN,
    FieldError,
    PayloadError,
    _key_parts,
    _Text,
    load_handler_call,
    parse_bracketed,
    parse_urlencoded,
)


# The marshmallow schema the HANDLER used before load_handler_call replaced it, kept here as the
# reference the hand-written validator must agree with (what it accepts, what it refuses).
class ReferenceHandlerAuth(Schema):
    class Meta:
        unknown = EXCLUDE

    member_id = _Text(validate=validate.Length(min=1, max=MAX_MEMBER_ID))
    application_token = _Text(validate=validate.Length(min=1, max=MAX_APPLICATION_TOKEN))


class ReferenceHandler(Schema):
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
    auth = fields.Nested(ReferenceHandlerAuth, load_default=None)

    @validates_schema
    def check_bindings(self, data, **kwargs):
        for index, binding in (data.get("bindings") or {}).items():
            if not isinstance(binding, dict) or not all(
                isinstance(v, str) for v in binding.values()
            ):
                raise ValidationError("each binding must be a table of text values", "bindings")
            if not str(index).isdigit():
                raise ValidationError("binding keys must be numbers", "bindings")


SCHEMA = ReferenceHandler()
FAST = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# -- parse_urlencoded ---------------------------------------------------------------------------

_form_text = st.lists(
    st.one_of(
        st.sampled_from(["&", "=", "+", "%", "%2", "%20", "%41", "%C3%A9", "%FF", "%zz", "[", "]"]),
        st.text(alphabet="ab1[]_é -", max_size=6),
    ),
    max_size=30,
).map("".join)


@FAST
@given(_form_text)
def test_parse_urlencoded_is_parse_qsl(text):
    assert parse_urlencoded(text) == parse_qsl(text, keep_blank_values=True)


@FAST
@given(st.lists(st.tuples(st.text(max_size=12), st.text(max_size=20)), max_size=10))
def test_parse_urlencoded_reads_what_urlencode_wrote(pairs):
    assert parse_urlencoded(urlencode(pairs)) == pairs


# -- bracketed keys -----------------------------------------------------------------------------


def _regex_parts(key):
    match = _KEY_RE.match(key)
    if not match:
        return None
    return [match.group(1), *_PART_RE.findall(match.group(2))]


@FAST
@given(st.text(alphabet="ab[]_1", max_size=12))
def test_key_parts_fast_path_agrees_with_the_pattern(key):
    expected = _regex_parts(key)
    if expected is None:
        with pytest.raises(PayloadError):
            _key_parts(key)
    else:
        assert list(_key_parts(key)) == expected


# -- load_handler_call --------------------------------------------------------------------------

_text = st.one_of(
    st.sampled_from(
        [
            "",
            "SMS",
            "sms",
            "smslog",
            "a" * 64,
            "a" * 65,
            "+14155550100",
            "crm",
            "x.y-z_1",
            "bad code",
            "abc\n",
            "0",
            "12",
        ]
    ),
    st.text(max_size=8),
)
_leaf = st.one_of(_text, st.none(), st.integers(-2, 2), st.booleans())
_value = st.recursive(_leaf, lambda inner: st.dictionaries(_text, inner, max_size=3), max_leaves=6)
_auth = st.dictionaries(
    st.sampled_from(["member_id", "application_token", "access_token", "domain"]),
    st.one_of(_text, st.just("t" * 256), _value),
    max_size=4,
)
_bindings = st.dictionaries(
    st.sampled_from(["0", "1", "x", "-1"]),
    st.one_of(
        st.dictionaries(st.sampled_from(["OWNER_ID", "OWNER_TYPE_ID"]), _text, max_size=2), _value
    ),
    max_size=2,
)
_MISSING = object()


def _mostly(valid, other):
    """Usually a valid value, sometimes anything, null, or nothing at all."""
    rare = (other, st.none(), st.just(_MISSING))
    return st.integers(0, 12).flatmap(lambda i: valid if i < 10 else rare[i - 10])


_payload = st.fixed_dictionaries(
    {
        "code": _mostly(st.sampled_from(["smslog", "x.y-z_1", "a" * 64]), _text),
        "message_id": _mostly(st.from_regex(r"\A[A-Za-z0-9_.-]{1,64}\Z"), _text),
        "message_to": _mostly(st.sampled_from(["+14155550100", "(415) 555-0100", "0"]), _text),
        "message_body": _mostly(
            st.text(min_size=1, max_size=20), st.one_of(_text, st.just("b" * 65537))
        ),
        "type": _mostly(st.just("SMS"), _value),
        "module_id": _mostly(
            st.sampled_from(["crm", "bizproc", "m" * 32]),
            st.one_of(_text, st.just("m" * 33), _value),
        ),
        "auth": _mostly(
            st.fixed_dictionaries(
                {},
                optional={
                    "member_id": st.text(min_size=1, max_size=64),
                    "application_token": st.text(min_size=1, max_size=255),
                    "access_token": _value,
                    "domain": _value,
                },
            ),
            st.one_of(_auth, _value),
        ),
        "bindings": _mostly(
            st.dictionaries(
                st.sampled_from(["0", "1", "12"]),
                st.dictionaries(
                    st.sampled_from(["OWNER_ID", "OWNER_TYPE_ID"]), st.text(max_size=4), max_size=2
                ),
                max_size=2,
            ),
            st.one_of(_bindings, _value),
        ),
    },
    optional={
        "ts": _mostly(st.text(max_size=10), _value),
        "workflow_id": _mostly(st.text(max_size=10), _value),
        "document_id": _value,
        "document_type": _value,
        "properties": _value,
        "other": _value,
    },
).map(lambda payload: {k: v for k, v in payload.items() if v is not _MISSING})


def _schema_load(payload):
    try:
        return SCHEMA.load(payload)
    except ValidationError:
        return "refused"


def _fast_load(payload):
    try:
        return load_handler_call(payload)
    except FieldError as exc:
        assert exc.field and str(exc)  # the error names a field and says what is wrong
        return "refused"


@pytest.mark.slow
def test_handler_validator_accepts_and_refuses_what_the_schema_did():
    tally: Counter[str] = Counter()

    @settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(_payload)
    def check(payload):
        loaded = _fast_load(payload)
        assert loaded == _schema_load(payload)
        tally["refused" if loaded == "refused" else "accepted"] += 1

    check()
    # Not vacuous: many payloads are accepted, many refused.
    assert tally["accepted"] >= 150 and tally["refused"] >= 150, tally


def test_fast_handler_load_takes_a_bitrix24_call_as_the_schema_does(emulator):
    portal = emulator.add_portal()
    fields = {
        "type": "SMS",
        "code": "smslog",
        "message_id": "0123456789abcdef0123456789abcdef",
        "message_to": "+14155550100",
        "message_body": "Your code: 1234",
        "ts": "1742895600",
        "module_id": "crm",
        "bindings[0][OWNER_TYPE_ID]": "3",
        "bindings[0][OWNER_ID]": "42",
        "properties[phone_number]": "+14155550100",
        "properties[message_text]": "Your code",
        "auth[access_token]": "a" * 40,
        "auth[expires_in]": "3600",
        "auth[domain]": portal.domain,
        "auth[member_id]": portal.member_id,
        "auth[application_token]": "t" * 32,
    }
    payload = parse_bracketed(parse_urlencoded(urlencode(fields)))
    fast = load_handler_call(payload)
    assert fast == SCHEMA.load(payload)
    assert fast["auth"] == {"member_id": portal.member_id, "application_token": "t" * 32}
    assert fast["bindings"] == {"0": {"OWNER_TYPE_ID": "3", "OWNER_ID": "42"}}
    # The bizproc shape, and a call without auth[…]
    bizproc = {
        **payload,
        "module_id": "bizproc",
        "workflow_id": "w1",
        "document_id": {"0": "crm", "1": "CCrmDocumentContact", "2": "CONTACT_1"},
    }
    del bizproc["auth"], bizproc["bindings"]
    assert load_handler_call(bizproc) == SCHEMA.load(bizproc)
