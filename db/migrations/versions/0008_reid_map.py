"""re-identification map of de-identified exports (originals encrypted)

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-23 16:25:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

S = sqlmodel.sql.sqltypes.AutoString


def upgrade() -> None:
    op.create_table(
        "reid_map",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("kind", S(length=32), nullable=False),
        sa.Column("pseudonym", S(length=64), nullable=False),
        sa.Column("original_encrypted", S(length=1024), nullable=False),
        sa.Column("created_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("kind", "pseudonym", name="uq_reid_key"),
    )
    op.create_index(op.f("ix_reid_map_pseudonym"), "reid_map", ["pseudonym"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_reid_map_pseudonym"), table_name="reid_map")
    op.drop_table("reid_map")
