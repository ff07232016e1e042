"""cost that does not grow with history: indexes for the recurring queries, message counts,
retention's redaction mark

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02 02:40:00
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# Written out here rather than imported from the models: a migration must keep meaning what it
# meant when it was written.
NOT_FINAL = "status IN ('queued', 'sent')"
FINAL = "status IN ('delivered', 'undelivered', 'failed')"

#: (name, columns, partial index condition or None)
INDEXES = (
    ("ix_messages_portal_id", ["portal_id", "id"], None),
    ("ix_messages_portal_status_id", ["portal_id", "status", "id"], None),
    ("ix_messages_portal_code_id", ["portal_id", "code", "id"], None),
    ("ix_messages_sending", ["sending_since"], "sending_since IS NOT NULL"),
    ("ix_messages_code_sending", ["code", "sending_since"], "sending_since IS NOT NULL"),
    (
        "ix_messages_due",
        ["next_attempt_at"],
        "next_attempt_at IS NOT NULL AND sending_since IS NULL",
    ),
    ("ix_messages_not_final_code_updated", ["code", "updated_at"], NOT_FINAL),
    ("ix_messages_unredacted", ["created_at"], f"{FINAL} AND redacted_at IS NULL"),
    ("ix_messages_final_created", ["created_at"], FINAL),
    # replaces 0001's ix_messages_portal_created (portal_id, created_at): the app page's
    # statistics then read the index alone
    (
        "ix_messages_portal_created_covering",
        ["portal_id", "created_at", "code", "status", "external_id"],
        None,
    ),
)


def upgrade() -> None:
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.add_column(sa.Column("redacted_at", sa.DateTime(), nullable=True))
    for name, columns, where in INDEXES:
        condition: dict[str, Any] = {}
        if where is not None:
            condition = {"sqlite_where": sa.text(where), "postgresql_where": sa.text(where)}
        op.create_index(name, "messages", columns, unique=False, **condition)
    op.drop_index("ix_messages_portal_created", table_name="messages")

    counts = op.create_table(
        "message_counts",
        sa.Column("code", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("accepted", sa.Boolean(), nullable=False),
        sa.Column("slot", sa.Integer(), nullable=False),
        sa.Column("stored", sa.BigInteger(), nullable=False),
        sa.Column("removed", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("code", "status", "accepted", "slot"),
    )
    assert counts is not None
    # The counts of the messages stored so far: one scan, once.
    op.execute(
        "INSERT INTO message_counts (code, status, accepted, slot, stored, removed) "
        "SELECT code, status, accepted, 0, COUNT(*), 0 FROM ("
        "  SELECT code, status, CASE WHEN external_id IS NOT NULL "
        "  OR status IN ('sent', 'delivered', 'undelivered') THEN true ELSE false END AS accepted"
        "  FROM messages) AS keyed "
        "GROUP BY code, status, accepted"
    )


def downgrade() -> None:
    op.drop_table("message_counts")
    op.create_index(
        "ix_messages_portal_created", "messages", ["portal_id", "created_at"], unique=False
    )
    for name, _, _ in reversed(INDEXES):
        op.drop_index(name, table_name="messages")
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.drop_column("redacted_at")
