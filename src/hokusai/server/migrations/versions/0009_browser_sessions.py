"""Browser sign-in: sessions and one-time login links.

Revision ID: 0009_browser_sessions
Revises: 0008_events
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

revision = "0009_browser_sessions"
down_revision = "0008_events"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "browser_sessions",
        sa.Column("id_hash", sa.String(64), primary_key=True),
        sa.Column("key_id", sa.String(32), sa.ForeignKey("api_keys.id", ondelete="CASCADE"), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("address", sa.String(64), nullable=True),
    )
    op.create_index("ix_browser_sessions_key_id", "browser_sessions", ["key_id"])
    op.create_index("ix_browser_sessions_expires_at", "browser_sessions", ["expires_at"])
    op.create_table(
        "login_links",
        sa.Column("token_hash", sa.String(64), primary_key=True),
        sa.Column("key_id", sa.String(32), sa.ForeignKey("api_keys.id", ondelete="CASCADE"), nullable=False),
        sa.Column("next_path", sa.String(2000), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("used_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_login_links_key_id", "login_links", ["key_id"])
    op.create_index("ix_login_links_expires_at", "login_links", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_login_links_expires_at", "login_links")
    op.drop_index("ix_login_links_key_id", "login_links")
    op.drop_table("login_links")
    op.drop_index("ix_browser_sessions_expires_at", "browser_sessions")
    op.drop_index("ix_browser_sessions_key_id", "browser_sessions")
    op.drop_table("browser_sessions")
