"""protocol: payment state, event bindings, reconcile state, per-method limits

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("portals") as batch:
        batch.add_column(sa.Column("payment_state", sa.String(length=32), nullable=True))
        batch.add_column(sa.Column("event_bindings", sa.String(length=255), nullable=True))
        batch.add_column(sa.Column("reconciled_at", sa.DateTime(), nullable=True))
        batch.add_column(sa.Column("reconcile_error", sa.Text(), nullable=True))
    op.create_table(
        "method_limits",
        sa.Column("portal_id", sa.Integer(), nullable=False),
        sa.Column("method", sa.String(length=128), nullable=False),
        sa.Column("blocked_until", sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(["portal_id"], ["portals.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("portal_id", "method"),
    )


def downgrade() -> None:
    op.drop_table("method_limits")
    with op.batch_alter_table("portals") as batch:
        batch.drop_column("reconcile_error")
        batch.drop_column("reconciled_at")
        batch.drop_column("event_bindings")
        batch.drop_column("payment_state")
