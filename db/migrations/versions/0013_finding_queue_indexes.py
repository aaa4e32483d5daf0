"""finding: the review queue's two orders as partial indexes of closed findings, so its first page is read
in index order (db/reviews.py) instead of sorting every pending finding; review.decision indexed, so the
queue's counts by review state can stop at a limit

Revision ID: 0013
Revises: 0012
Create Date: 2026-11-30 15:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CLOSED = sa.text("kind = 'closed'")


def upgrade() -> None:
    # `critical`: flagged first, then P(yes) highest first (critical questions are a condition of each segment)
    op.create_index(
        "ix_finding_queue_critical",
        "finding",
        ["flagged", sa.text("probability DESC"), "id"],
        postgresql_where=CLOSED,
        sqlite_where=CLOSED,
    )
    # `uncertain`: flagged first, then P(yes) nearest 0.5 first
    op.create_index(
        "ix_finding_queue_uncertain",
        "finding",
        ["flagged", sa.text("abs(coalesce(probability, 0.0) - 0.5)"), "id"],
        postgresql_where=CLOSED,
        sqlite_where=CLOSED,
    )
    with op.batch_alter_table("review", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_review_decision"), ["decision"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("review", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_review_decision"))
    op.drop_index("ix_finding_queue_uncertain", table_name="finding")
    op.drop_index("ix_finding_queue_critical", table_name="finding")
