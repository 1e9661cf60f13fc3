"""Stable model ids and idempotent registration.

Revision ID: 0003_model_ids_idempotency
Revises: 0002_stage_transitions
Create Date: 2026-11-26
"""

import sqlalchemy as sa
from alembic import op

revision = "0003_model_ids_idempotency"
down_revision = "0002_stage_transitions"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "model_ids",
        sa.Column("model_id", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(256), nullable=False, unique=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "idempotency_records",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("key_id", sa.String(32), nullable=False),
        sa.Column("idempotency_key", sa.String(200), nullable=False),
        sa.Column("request_hash", sa.String(64), nullable=False),
        sa.Column("response", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("key_id", "idempotency_key", name="uq_idempotency_key_per_api_key"),
    )


def downgrade() -> None:
    op.drop_table("idempotency_records")
    op.drop_table("model_ids")
