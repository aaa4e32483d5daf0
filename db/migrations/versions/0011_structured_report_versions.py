"""structured_report.verified and .predecessor_id: the reviewers' verdicts are a new SR version

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-02 10:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("structured_report", schema=None) as batch_op:
        batch_op.add_column(sa.Column("verified", sa.Boolean(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("predecessor_id", sa.Integer(), nullable=True))
        batch_op.create_foreign_key(
            "fk_structured_report_predecessor_id", "structured_report", ["predecessor_id"], ["id"]
        )


def downgrade() -> None:
    with op.batch_alter_table("structured_report", schema=None) as batch_op:
        batch_op.drop_constraint("fk_structured_report_predecessor_id", type_="foreignkey")
        batch_op.drop_column("predecessor_id")
        batch_op.drop_column("verified")
