"""validation runs, model promotion, backfill progress

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-23 16:10:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

S = sqlmodel.sql.sqltypes.AutoString
T = sqlmodel.sql.sqltypes.UTCDateTime


def upgrade() -> None:
    with op.batch_alter_table("model_version", schema=None) as batch_op:
        batch_op.add_column(sa.Column("promoted_at", T(), nullable=True))
    op.create_table(
        "validation_run",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model_version_id", sa.Integer(), nullable=False),
        sa.Column("dataset", S(length=512), nullable=False),
        sa.Column("dataset_sha", S(length=64), nullable=False),
        sa.Column("examples", sa.Integer(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("temperature", sa.Float(), nullable=True),
        sa.Column("created_at", T(), nullable=False),
        sa.ForeignKeyConstraint(["model_version_id"], ["model_version.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_validation_run_model_version_id"), "validation_run", ["model_version_id"], unique=False)
    op.create_table(
        "backfill",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("key", S(length=255), nullable=False),
        sa.Column("source_id", sa.Integer(), nullable=False),
        sa.Column("start_date", S(length=8), nullable=False),
        sa.Column("end_date", S(length=8), nullable=False),
        sa.Column("modalities", S(length=64), nullable=False),
        sa.Column("next_date", S(length=8), nullable=False),
        sa.Column("status", S(length=32), nullable=False),
        sa.Column("days_done", sa.Integer(), nullable=False),
        sa.Column("queries", sa.Integer(), nullable=False),
        sa.Column("studies_found", sa.Integer(), nullable=False),
        sa.Column("studies_new", sa.Integer(), nullable=False),
        sa.Column("last_error", S(length=1000), nullable=True),
        sa.Column("created_at", T(), nullable=False),
        sa.Column("updated_at", T(), nullable=False),
        sa.ForeignKeyConstraint(["source_id"], ["pacs_source.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("key"),
    )


def downgrade() -> None:
    op.drop_table("backfill")
    op.drop_index(op.f("ix_validation_run_model_version_id"), table_name="validation_run")
    op.drop_table("validation_run")
    with op.batch_alter_table("model_version", schema=None) as batch_op:
        batch_op.drop_column("promoted_at")
