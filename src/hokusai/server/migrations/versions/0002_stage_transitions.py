"""Stage transitions made through the service.

Revision ID: 0002_stage_transitions
Revises: 0001_api_keys
Create Date: 2026-11-26
"""

import sqlalchemy as sa
from alembic import op

revision = "0002_stage_transitions"
down_revision = "0001_api_keys"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "stage_transitions",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("model_name", sa.String(256), nullable=False),
        sa.Column("version", sa.String(32), nullable=False),
        sa.Column("stage", sa.String(16), nullable=False),
        sa.Column("key_id", sa.String(32), nullable=True),
        sa.Column("transitioned_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_stage_transitions_model_version", "stage_transitions", ["model_name", "version"])


def downgrade() -> None:
    op.drop_index("ix_stage_transitions_model_version", table_name="stage_transitions")
    op.drop_table("stage_transitions")
