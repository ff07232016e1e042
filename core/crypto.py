"""Secrets at rest: the key set, the encrypted column type and the re-encryption of stored rows.

Portal tokens (access, refresh and application tokens), and any later secret column, are stored
encrypted with Fernet (AES-128-CBC with an HMAC-SHA256, from the ``cryptography`` library)
under a :class:`KeySet`: ``[service] encryption_keys``, the first key encrypts and every key
decrypts (:class:`cryptography.fernet.MultiFernet`), so a new key can be put first while rows
written under the old one are still read.

How it is wired (no import-time global): an :class:`EncryptedText` column encrypts and decrypts
with the key set bound to the SQLAlchemy engine that runs the statement.
:class:`b24sms.service.Service` builds the key set from the config and calls
:func:`bind_keys` right after it creates the :class:`~b24sms.db.Database`; anything else that
opens its own engine on the same database (a test, a one-off script) calls
``bind_keys(db.engine, KeySet([...]))`` itself. An engine without keys refuses to write a
secret (:class:`KeysNotConfigured`) instead of storing it in plaintext.

Stored values are ``fernet:<token>``. A value without that prefix is a plaintext row from
before encryption: it is read as it is and encrypted by the next write or by
:func:`rotate_stored_secrets` (``b24sms keys rotate``), which re-encrypts every encrypted column
of every table under the first key, batch by batch, and skips rows already under it, so it is
idempotent and safe to run again after an interruption.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from sqlalchemy import Column, MetaData, String, Table, Text, select, type_coerce, update
from sqlalchemy.engine import Connection, Dialect, Engine
from sqlalchemy.types import TypeDecorator

log = logging.getLogger(__name__)

#: what marks a stored value as encrypted (anything else is a plaintext row from before)
PREFIX = "fernet:"
#: the attribute of an engine's dialect that holds its key set (see :func:`bind_keys`)
_DIALECT_ATTRIBUTE = "b24sms_keys"
#: rows read and re-encrypted per transaction by :func:`rotate_stored_secrets`
ROTATE_BATCH = 200


class EncryptionKeyError(Exception):
    """Base of the errors about encryption keys."""


class KeysNotConfigured(EncryptionKeyError):
    """A secret was written through an engine that has no key set bound."""


class UndecryptableSecret(EncryptionKeyError):
    """A stored secret was encrypted under a key that is not in ``encryption_keys``."""


class InvalidKey(EncryptionKeyError, ValueError):
    """A configured key is not a Fernet key (32 url-safe base64-encoded bytes)."""


def generate_key() -> str:
    """A new random Fernet key, as ``encryption_keys`` takes it."""
    return Fernet.generate_key().decode("ascii")


def key_id(key: str) -> str:
    """A short, safe-to-print name of a key: the first 8 hex digits of its SHA-256."""
    return hashlib.sha256(key.encode("ascii")).hexdigest()[:8]


class KeySet:
    """The configured Fernet keys: the first encrypts, all decrypt."""

    def __init__(self, keys: Sequence[str]) -> None:
        """:raises InvalidKey: naming the position of a key that is not a Fernet key (never
        the key itself)."""
        if not keys:
            raise InvalidKey("at least one encryption key is needed")
        fernets = []
        for index, key in enumerate(keys):
            try:
                fernets.append(Fernet(key.encode("ascii")))
            except (ValueError, UnicodeEncodeError):
                raise InvalidKey(
                    f"key #{index + 1} is not a Fernet key (32 url-safe base64-encoded bytes; "
                    "make one with `b24sms keys generate`)"
                ) from None
        self.ids = [key_id(key) for key in keys]
        self._primary = fernets[0]
        self._all = MultiFernet(fernets)

    @property
    def primary_id(self) -> str:
        """The :func:`key_id` of the key that encrypts."""
        return self.ids[0]

    def encrypt(self, plaintext: str) -> str:
        """``fernet:<token>`` of ``plaintext`` under the first key."""
        return PREFIX + self._primary.encrypt(plaintext.encode("utf-8")).decode("ascii")

    def decrypt(self, stored: str) -> str:
        """The plaintext of a stored value; a value without the prefix is returned as it is.

        :raises UndecryptableSecret: when no configured key opens it.
        """
        if not is_encrypted(stored):
            return stored
        try:
            return self._all.decrypt(stored[len(PREFIX) :].encode("ascii")).decode("utf-8")
        except (InvalidToken, UnicodeError):
            raise UndecryptableSecret(
                "a stored secret cannot be decrypted with any key in encryption_keys "
                "(was the key it was written with removed?)"
            ) from None

    def is_current(self, stored: str) -> bool:
        """True when ``stored`` is encrypted under the first key (nothing to rotate)."""
        if not is_encrypted(stored):
            return False
        try:
            self._primary.decrypt(stored[len(PREFIX) :].encode("ascii"))
        except InvalidToken:
            return False
        return True

    def __repr__(self) -> str:  # never the keys
        return f"<KeySet {', '.join(self.ids)}>"


def is_encrypted(stored: str) -> bool:
    """Whether a stored value is one of ours (``fernet:…``) rather than a plaintext row."""
    return stored.startswith(PREFIX)


# -- the column type ------------------------------------------------------------------------------


def bind_keys(engine: Engine, keys: KeySet) -> None:
    """Make ``engine`` encrypt and decrypt :class:`EncryptedText` columns with ``keys``.

    The key set is kept on the engine's dialect, which SQLAlchemy hands to every type's bind
    and result processing; each engine has its own dialect, so two services in one process
    (tests) keep their own keys.
    """
    setattr(engine.dialect, _DIALECT_ATTRIBUTE, keys)


def keys_of(dialect: Dialect) -> KeySet | None:
    """The key set bound to the engine of ``dialect``, or None."""
    return getattr(dialect, _DIALECT_ATTRIBUTE, None)


class EncryptedText(TypeDecorator[str]):
    """A string column stored encrypted (``fernet:…``) under the engine's key set.

    ``length`` is the longest plaintext accepted (checked by the code that validates input, as
    ``column.type.length``); the stored ciphertext is longer, so the column is TEXT where the
    database enforces lengths (PostgreSQL: migration 0003) and stays as it was on SQLite, which
    does not. Encrypted values differ on every write, so such a column cannot be compared in a
    query.
    """

    impl = Text
    cache_ok = True

    def __init__(self, length: int | None = None) -> None:
        super().__init__()
        #: the longest plaintext, for input validation (the database column is unbounded)
        self.length = length

    def load_dialect_impl(self, dialect: Dialect) -> Any:
        if dialect.name == "sqlite":
            # SQLite ignores declared lengths; keeping VARCHAR spares a table rebuild.
            return String(self.length)
        return Text()

    def process_bind_param(self, value: str | None, dialect: Dialect) -> str | None:
        if value is None:
            return None
        keys = keys_of(dialect)
        if keys is None:
            raise KeysNotConfigured(
                "this database engine has no encryption keys: call "
                "b24sms.crypto.bind_keys(engine, KeySet(...)) (the Service does it)"
            )
        return keys.encrypt(value)

    def process_result_value(self, value: str | None, dialect: Dialect) -> str | None:
        if value is None or not is_encrypted(value):
            return value
        keys = keys_of(dialect)
        if keys is None:
            raise KeysNotConfigured(
                "this database engine has no encryption keys to read an encrypted column with"
            )
        return keys.decrypt(value)


class EncryptedJSON(EncryptedText):
    """A JSON value (say, a portal's secret gateway options) stored encrypted like
    :class:`EncryptedText`, and rotated with it. Assign a new value to change it: changes made
    inside a loaded dict are not noticed by the session."""

    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> str | None:
        if value is None:
            return None
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
        return super().process_bind_param(text, dialect)

    def process_result_value(self, value: str | None, dialect: Dialect) -> Any:
        text = super().process_result_value(value, dialect)
        return None if text is None else json.loads(text)


# -- rotation -------------------------------------------------------------------------------------


@dataclass
class ColumnReport:
    """What a rotation did to one encrypted column."""

    table: str
    column: str
    #: rows holding a value (NULLs are not counted)
    rows: int = 0
    #: rows written anew under the first key (plaintext or an older key before)
    rotated: int = 0
    #: rows that were plaintext before (counted in ``rotated`` too)
    plaintext: int = 0
    #: rows no configured key opens: left untouched
    undecryptable: int = 0
    #: rows another writer changed between our read and our write (already current)
    changed_meanwhile: int = 0

    def describe(self, verb: str = "re-encrypted") -> str:
        """One line for the CLI: ``portals.access_token: 3 stored, 1 re-encrypted …``."""
        text = (
            f"{self.table}.{self.column}: {self.rows} stored, {self.rotated} {verb} "
            f"({self.plaintext} were plaintext), {self.rows - self.rotated - self.undecryptable} "
            "already under the first key"
        )
        if self.undecryptable:
            text += f", {self.undecryptable} NOT decryptable with any configured key"
        return text


@dataclass
class RotationReport:
    """Per column, what :func:`rotate_stored_secrets` did."""

    key_id: str
    columns: list[ColumnReport] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """False when some row could not be decrypted (a key is missing from the config)."""
        return not any(column.undecryptable for column in self.columns)


def encrypted_columns(metadata: MetaData) -> list[tuple[Table, Column[Any]]]:
    """Every (table, column) of ``metadata`` whose type is :class:`EncryptedText`."""
    found = []
    for table in metadata.sorted_tables:
        for column in table.columns:
            if isinstance(column.type, EncryptedText):
                found.append((table, column))
    return found


def rotate_stored_secrets(
    engine: Engine,
    metadata: MetaData,
    keys: KeySet,
    *,
    batch_size: int = ROTATE_BATCH,
    transaction: Callable[[], Any] | None = None,
    progress: Callable[[ColumnReport], None] | None = None,
    dry_run: bool = False,
) -> RotationReport:
    """Re-encrypt every stored secret that is not under the first key of ``keys``.

    Each batch is one transaction; a row is written only when its stored value is still the
    one read (a token refreshed meanwhile is already encrypted under the first key). Rows under
    the first key are not written again, so a second run changes nothing.

    :param transaction: a context manager factory giving a connection in a transaction
        (default ``engine.begin``; the service passes ``db.connection`` so SQLite writers
        take turns with the rest of the process).
    :param progress: called with the column's report after each batch.
    :param dry_run: count what would be re-encrypted, write nothing (``keys rotate --check``).
    """
    begin = transaction or engine.begin
    report = RotationReport(key_id=keys.primary_id)
    for table, column in encrypted_columns(metadata):
        (primary,) = table.primary_key.columns
        column_report = ColumnReport(table.name, column.name)
        report.columns.append(column_report)
        last: Any = None
        while True:
            with begin() as conn:
                rows = _batch(conn, table, column, primary, last, batch_size)
                if not rows:
                    break
                last = rows[-1][0]
                _rotate_rows(conn, table, column, primary, rows, keys, column_report, dry_run)
            if progress is not None:
                progress(column_report)
    return report


def _raw(column: Column[Any]) -> Any:
    # The stored text itself: no decryption on the way out, no encryption on the way in.
    return type_coerce(column, Text())


def _batch(
    conn: Connection,
    table: Table,
    column: Column[Any],
    primary: Column[Any],
    after: Any,
    size: int,
) -> list[Any]:
    query = select(primary, _raw(column)).where(column.is_not(None)).order_by(primary).limit(size)
    if after is not None:
        query = query.where(primary > after)
    return list(conn.execute(query).all())


def _rotate_rows(
    conn: Connection,
    table: Table,
    column: Column[Any],
    primary: Column[Any],
    rows: Iterable[Any],
    keys: KeySet,
    column_report: ColumnReport,
    dry_run: bool,
) -> None:
    for row_id, stored in rows:
        column_report.rows += 1
        if keys.is_current(stored):
            continue
        try:
            plaintext = keys.decrypt(stored)
        except UndecryptableSecret:
            column_report.undecryptable += 1
            log.error(
                "%s.%s of row %s cannot be decrypted with any configured key; left as it is",
                table.name,
                column.name,
                row_id,
            )
            continue
        if dry_run:
            column_report.rotated += 1
            column_report.plaintext += not is_encrypted(stored)
            continue
        written = conn.execute(
            update(table)
            .where(primary == row_id, _raw(column) == stored)
            .values({column.name: type_coerce(keys.encrypt(plaintext), Text())})
        ).rowcount
        if written:
            column_report.rotated += 1
            column_report.plaintext += not is_encrypted(stored)
        else:
            column_report.changed_meanwhile += 1
