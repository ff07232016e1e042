"""encrypted tokens, health check row

Portal tokens are stored encrypted (b24sms.crypto): ``fernet:`` and a Fernet token, longer than
the plaintext, so their columns become TEXT on PostgreSQL (SQLite ignores declared lengths and
keeps its columns; rebuilding the portals table there would cascade-delete its messages).
Existing plaintext rows stay readable and are encrypted by ``b24sms keys rotate``.
``health_checks`` holds the row ``GET /healthz`` rewrites to prove the database takes writes.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

TOKEN_COLUMNS = ("access_token", "refresh_token", "application_token")


def upgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        for column in TOKEN_COLUMNS:
            op.alter_column("portals", column, type_=sa.Text(), existing_type=sa.String(length=255))
    op.create_table(
        "health_checks",
        sa.Column("name", sa.String(length=32), nullable=False),
        sa.Column("checked_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )


def downgrade() -> None:
    op.drop_table("health_checks")
    if op.get_bind().dialect.name != "sqlite":
        # Fails on rows longer than 255 characters: decrypt first (not supported) or keep 0003.
        for column in TOKEN_COLUMNS:
            op.alter_column("portals", column, type_=sa.String(length=255), existing_type=sa.Text())
