"""per-portal HANDLER key versions (rotation)

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 03:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("portals") as batch:
        batch.add_column(
            sa.Column("handler_key_version", sa.Integer(), server_default="0", nullable=False)
        )
        batch.add_column(
            sa.Column("handler_key_oldest", sa.Integer(), server_default="0", nullable=False)
        )


def downgrade() -> None:
    with op.batch_alter_table("portals") as batch:
        batch.drop_column("handler_key_oldest")
        batch.drop_column("handler_key_version")
