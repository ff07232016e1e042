"""The ``email`` gateway against a real SMTP server (aiosmtpd) on 127.0.0.1."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from aiosmtpd.smtp import AuthResult, LoginPassword

from b24sms.gateway import OutgoingMessage, PermanentGatewayError, RetryableGatewayError
from b24sms.plugins import PluginError, build_gateways, gateway_types, make_plugin_manager
from tests.fakes.smtp_server import LoopbackController, Recorder

PASSWORD = "smtp-pass-TOPSECRET"


def authenticate(server, session, envelope, mechanism, auth_data):
    ok = isinstance(auth_data, LoginPassword) and auth_data.password == PASSWORD.encode()
    return AuthResult(success=ok, handled=False)


@pytest.fixture
def smtp() -> Iterator[tuple[Recorder, LoopbackController]]:
    recorder = Recorder()
    controller = LoopbackController(
        recorder,
        hostname="127.0.0.1",
        port=0,
        authenticator=authenticate,
        auth_require_tls=False,
    )
    controller.start()
    try:
        yield recorder, controller
    finally:
        controller.stop()


@pytest.fixture(scope="module")
def types():
    return gateway_types(make_plugin_manager({"B24SMS_LOAD_PLUGINS": "email"}))


@pytest.fixture
def make(types, smtp):
    _, controller = smtp

    def make(**overrides):
        options = {
            "smtp_host": "127.0.0.1",
            "smtp_port": controller.port,
            "security": "none",
            "from": "Bitrix24 SMS <sms@example.com>",
            "address": "{digits}@sms.example.com",
            "timeout": 5,
        }
        options.update(overrides)
        options = {k: v for k, v in options.items() if v is not None}
        providers = {"mail": {"plugin": "email", "options": options}}
        return build_gateways(providers, types, "https://sms.example.com")["mail"]

    return make


def message(**overrides) -> OutgoingMessage:
    fields = {
        "id": 5,
        "message_id": "b24-5",
        "code": "mail",
        "member_id": "m",
        "to": "+14155550100",
        "body": "Ваш код: 1234 — thanks!",
        "callback_url": "https://sms.example.com/gateways/mail/callback",
    }
    fields.update(overrides)
    return OutgoingMessage(**fields)


def test_the_mail_arrives_addressed_by_number(make, smtp):
    recorder, _ = smtp
    gateway = make(subject="SMS for {e164} via {code}")
    result = gateway.send(message())

    (envelope,) = recorder.mails
    assert envelope.rcpt_tos == ["14155550100@sms.example.com"]
    assert envelope.mail_from == "sms@example.com"
    mail = recorder.parsed()
    assert mail["To"] == "14155550100@sms.example.com"
    assert mail["From"] == "Bitrix24 SMS <sms@example.com>"
    assert mail["Subject"] == "SMS for +14155550100 via mail"
    assert mail.get_content().strip() == "Ваш код: 1234 — thanks!"
    assert mail["Message-ID"] == result.external_id
    assert result.external_id.endswith("@example.com>")
    assert (result.raw_status, result.status) == ("250", "sent")


def test_never_claims_delivered(make):
    gateway = make()
    assert set(gateway.statuses.values()) == {"sent"}
    assert gateway.map_status("250") == "sent"


def test_login_when_a_user_is_set(make, smtp):
    recorder, _ = smtp
    make(smtp_user="sms", smtp_password=PASSWORD).send(message())
    assert len(recorder.mails) == 1


def test_refused_login_is_permanent_and_the_password_stays_secret(make):
    gateway = make(smtp_user="sms", smtp_password="wrong-password-XYZ")
    with pytest.raises(PermanentGatewayError) as info:
        gateway.send(message())
    assert info.value.code == "535"
    assert "wrong-password-XYZ" not in str(info.value)


@pytest.mark.parametrize(
    ("number", "address"),
    [
        ("+4915112345678", "015112345678@mobile.example.de"),  # longest prefix +4915 wins
        ("+493012345678", "+493012345678@fixed.example.de"),
        ("+14155550100", "14155550100@sms.example.com"),  # no route: the address template
        ("+12125550100", "2125550100@nyc.example.com"),
    ],
)
def test_routes_longest_prefix_wins(make, smtp, number, address):
    recorder, _ = smtp
    gateway = make(
        routes={
            "+49": "{e164}@fixed.example.de",
            "+4915": "{national}@mobile.example.de",
            "+1212": "{national}@nyc.example.com",
        }
    )
    gateway.send(message(to=number))
    assert recorder.mails[-1].rcpt_tos == [address]


def test_no_route_and_no_address_is_permanent(make, smtp):
    gateway = make(address=None, routes={"+49": "{digits}@sms.example.de"})
    with pytest.raises(PermanentGatewayError) as info:
        gateway.send(message(to="+14155550100"))
    assert info.value.code == "no-route"
    assert smtp[0].mails == []


@pytest.mark.parametrize(
    ("answer", "error", "code"),
    [
        ("550 5.1.1 No such user", PermanentGatewayError, "550"),
        ("450 4.2.1 Mailbox busy, try later", RetryableGatewayError, "450"),
    ],
)
def test_refused_recipient(make, smtp, answer, error, code):
    smtp[0].rcpt_answer = answer
    with pytest.raises(error) as info:
        make().send(message())
    assert info.value.code == code


@pytest.mark.parametrize(
    ("answer", "error", "code"),
    [
        ("554 5.7.1 Rejected as spam", PermanentGatewayError, "554"),
        ("451 4.3.0 Local error, try again", RetryableGatewayError, "451"),
    ],
)
def test_refused_data(make, smtp, answer, error, code):
    smtp[0].data_answer = answer
    with pytest.raises(error) as info:
        make().send(message())
    assert info.value.code == code


def test_connection_refused_is_retryable(make):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again when the block ends
    with pytest.raises(RetryableGatewayError) as info:
        make(smtp_port=port).send(message())
    assert info.value.code == "connection"


def test_a_silent_server_times_out_retryably(make):
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        with pytest.raises(RetryableGatewayError) as info:
            make(smtp_port=silent.getsockname()[1], timeout=0.3).send(message())
    assert info.value.code == "timeout"


def test_starttls_required_but_not_offered_is_permanent(make):
    with pytest.raises(PermanentGatewayError) as info:
        make(security="starttls").send(message())
    assert "STARTTLS" in str(info.value)


@pytest.mark.parametrize(("security", "port"), [("starttls", 587), ("ssl", 465), ("none", 25)])
def test_default_port_follows_security(make, security, port):
    assert make(security=security, smtp_port=None).port == port


@pytest.mark.parametrize(
    ("number", "parts"),
    [
        ("+4915112345678", ("4915112345678", "+4915112345678", "015112345678")),
        ("+14155550100", ("14155550100", "+14155550100", "4155550100")),
        ("+442079460000", ("442079460000", "+442079460000", "02079460000")),
    ],
)
def test_number_parts(types, number, parts):
    import importlib

    module = importlib.import_module(types["email"].cls.__module__)
    got = module.number_parts(number)
    assert (got["digits"], got["e164"], got["national"]) == parts


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"address": "{phone}@x.example"}, "address"),
        ({"address": "{digits}"}, "address"),
        ({"address": "{digits!r}@x.example"}, "address"),
        ({"address": None}, "address"),
        ({"routes": {"49": "{digits}@x.example"}}, "routes"),
        ({"routes": {"+49": "nobody"}}, "routes"),
        ({"security": "tls"}, "security"),
        ({"from": "not an address"}, "from"),
        ({"smtp_password": PASSWORD}, "smtp_user"),
        ({"subject": "{body}"}, "subject"),
        ({"smtp_host": None}, "smtp_host"),
        ({"smtp_port": 70000}, "smtp_port"),
    ],
)
def test_bad_options(make, overrides, key):
    with pytest.raises(PluginError) as info:
        make(**overrides)
    text = str(info.value)
    assert f"providers.mail.{key}" in text and "'email'" in text
    assert PASSWORD not in text


@pytest.fixture(scope="module")
def self_signed(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1, made with the openssl command."""
    import shutil
    import ssl
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


@pytest.mark.parametrize("security", ["starttls", "ssl"])
def test_untrusted_certificates_are_refused(types, self_signed, security):
    recorder = Recorder()
    if security == "starttls":
        controller = LoopbackController(
            recorder, hostname="127.0.0.1", port=0, tls_context=self_signed
        )
    else:
        controller = LoopbackController(
            recorder, hostname="127.0.0.1", port=0, ssl_context=self_signed
        )
    controller.start()
    try:
        options = {
            "smtp_host": "127.0.0.1",
            "smtp_port": controller.port,
            "security": security,
            "from": "sms@example.com",
            "address": "{digits}@sms.example.com",
            "timeout": 5,
        }
        providers = {"mail": {"plugin": "email", "options": options}}
        gateway = build_gateways(providers, types, "https://sms.example.com")["mail"]
        with pytest.raises(PermanentGatewayError) as info:
            gateway.send(message())
        assert info.value.code == "tls" and "not trusted" in str(info.value)
        assert recorder.mails == []
    finally:
        controller.stop()
