"""DSPy programs and execution records.

Revision ID: 0005_dspy
Revises: 0004_analytics
Create Date: 2026-11-26
"""

import sqlalchemy as sa
from alembic import op

revision = "0005_dspy"
down_revision = "0004_analytics"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "dspy_programs",
        sa.Column("program_id", sa.String(128), primary_key=True),
        sa.Column("version", sa.String(64), primary_key=True),
        sa.Column("name", sa.String(256), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("module", sa.String(32), nullable=False),
        sa.Column("signatures", sa.JSON(), nullable=False),
        sa.Column("instructions", sa.Text(), nullable=False),
        sa.Column("demos", sa.JSON(), nullable=False),
        sa.Column("lm", sa.JSON(), nullable=True),
        sa.Column("source", sa.String(1000), nullable=True),
        sa.Column("created_by", sa.String(32), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "dspy_executions",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("program_id", sa.String(128), nullable=False),
        sa.Column("program_version", sa.String(64), nullable=False),
        sa.Column("batch_id", sa.String(36), nullable=True),
        sa.Column("key_id", sa.String(32), nullable=True),
        sa.Column("mode", sa.String(16), nullable=False),
        sa.Column("success", sa.Boolean(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("error_type", sa.String(64), nullable=True),
        sa.Column("duration_ms", sa.Float(), nullable=False),
        sa.Column("input_bytes", sa.Integer(), nullable=False),
        sa.Column("output_bytes", sa.Integer(), nullable=False),
        sa.Column("inputs", sa.JSON(), nullable=True),
        sa.Column("outputs", sa.JSON(), nullable=True),
        sa.Column("usage", sa.JSON(), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_dspy_executions_program_started", "dspy_executions", ["program_id", "started_at"])
    op.create_index("ix_dspy_executions_started", "dspy_executions", ["started_at"])


def downgrade() -> None:
    op.drop_index("ix_dspy_executions_started", "dspy_executions")
    op.drop_index("ix_dspy_executions_program_started", "dspy_executions")
    op.drop_table("dspy_executions")
    op.drop_table("dspy_programs")
