"""Evaluations carry an owner, a heartbeat and a lease, so a starting process reclaims only abandoned ones.

Revision ID: 0006_evaluation_leases
Revises: 0005_dspy
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

revision = "0006_evaluation_leases"
down_revision = "0005_dspy"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("evaluations") as table:
        table.add_column(sa.Column("owner", sa.String(64), nullable=True))
        table.add_column(sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True))
        table.add_column(sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True))
        table.add_column(sa.Column("request", sa.JSON(), nullable=True))
        table.add_column(sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"))
    op.create_index("ix_evaluations_status_lease", "evaluations", ["status", "lease_expires_at"])


def downgrade() -> None:
    op.drop_index("ix_evaluations_status_lease", "evaluations")
    with op.batch_alter_table("evaluations") as table:
        table.drop_column("attempts")
        table.drop_column("request")
        table.drop_column("lease_expires_at")
        table.drop_column("heartbeat_at")
        table.drop_column("owner")
