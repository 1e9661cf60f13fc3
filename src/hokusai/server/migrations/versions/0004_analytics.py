"""Contributions, prediction records and evaluations: what the model analytics compute from.

Revision ID: 0004_analytics
Revises: 0003_model_ids_idempotency
Create Date: 2026-11-26
"""

import sqlalchemy as sa
from alembic import op

revision = "0004_analytics"
down_revision = "0003_model_ids_idempotency"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "contributions",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("address", sa.String(42), nullable=False),
        sa.Column("model_name", sa.String(256), nullable=False),
        sa.Column("version", sa.String(32), nullable=False),
        sa.Column("model_id", sa.String(32), nullable=True),
        sa.Column("weight", sa.Float(), nullable=False),
        sa.Column("benchmark_metric", sa.String(250), nullable=True),
        sa.Column("benchmark_value", sa.Float(), nullable=True),
        sa.Column("parent", sa.String(300), nullable=True),
        sa.Column("parent_value", sa.Float(), nullable=True),
        sa.Column("improvement_score", sa.Float(), nullable=False),
        sa.Column("contributed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("address", "model_name", "version", name="uq_contribution_per_version"),
    )
    op.create_index("ix_contributions_address_contributed_at", "contributions", ["address", "contributed_at"])
    op.create_index("ix_contributions_model_version", "contributions", ["model_name", "version"])
    op.create_table(
        "prediction_records",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("model_name", sa.String(256), nullable=False),
        sa.Column("version", sa.String(32), nullable=False),
        sa.Column("predicted_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("rows", sa.Integer(), nullable=False),
        sa.Column("latency_ms", sa.Float(), nullable=False),
        sa.Column("success", sa.Boolean(), nullable=False),
    )
    op.create_index(
        "ix_prediction_records_model_version_at", "prediction_records", ["model_name", "version", "predicted_at"]
    )
    op.create_table(
        "evaluations",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("model_name", sa.String(256), nullable=False),
        sa.Column("version", sa.String(32), nullable=False),
        sa.Column("dataset_path", sa.String(1000), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.Column("error", sa.String(2000), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
    )


def downgrade() -> None:
    op.drop_table("evaluations")
    op.drop_index("ix_prediction_records_model_version_at", "prediction_records")
    op.drop_table("prediction_records")
    op.drop_index("ix_contributions_model_version", "contributions")
    op.drop_index("ix_contributions_address_contributed_at", "contributions")
    op.drop_table("contributions")
