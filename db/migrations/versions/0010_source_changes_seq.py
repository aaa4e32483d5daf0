"""pacs_source.changes_seq: where discovery stands in a PACS's change feed (Orthanc's /changes)

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-30 12:05:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("pacs_source", schema=None) as batch_op:
        batch_op.add_column(sa.Column("changes_seq", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("pacs_source", schema=None) as batch_op:
        batch_op.drop_column("changes_seq")
