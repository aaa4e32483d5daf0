"""structured reports, review users and decisions (append-only), study identity

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-23 16:20:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

S = sqlmodel.sql.sqltypes.AutoString


def upgrade() -> None:
    op.create_table(
        "structured_report",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("model_version_id", sa.Integer(), nullable=False),
        sa.Column("bank_version", S(length=32), nullable=False),
        sa.Column("sop_instance_uid", S(length=64), nullable=False),
        sa.Column("series_instance_uid", S(length=64), nullable=False),
        sa.Column("content_sha", S(length=64), nullable=False),
        sa.Column("object_key", S(length=512), nullable=False),
        sa.Column("images", sa.Integer(), nullable=False),
        sa.Column("findings", sa.Integer(), nullable=False),
        sa.Column("sent_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.Column("created_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(["model_version_id"], ["model_version.id"]),
        sa.ForeignKeyConstraint(["study_id"], ["study.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("sop_instance_uid"),
    )
    op.create_index(op.f("ix_structured_report_study_id"), "structured_report", ["study_id"], unique=False)
    op.create_table(
        "app_user",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", S(length=64), nullable=False),
        sa.Column("role", S(length=16), nullable=False),
        sa.Column("password_hash", S(length=255), nullable=False),
        sa.Column("disabled", sa.Boolean(), nullable=False),
        sa.Column("created_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_app_user_name"), "app_user", ["name"], unique=True)
    op.create_table(
        "review",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("finding_id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("decision", S(length=16), nullable=False),
        sa.Column("from_answer", S(length=255), nullable=True),
        sa.Column("to_answer", S(length=255), nullable=True),
        sa.Column("comment", S(length=2000), nullable=True),
        sa.Column("created_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(["finding_id"], ["finding.id"]),
        sa.ForeignKeyConstraint(["user_id"], ["app_user.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_review_finding_id"), "review", ["finding_id"], unique=False)
    op.create_index(op.f("ix_review_created_at"), "review", ["created_at"], unique=False)
    op.create_table(
        "study_identity",
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("patient_name", S(length=255), nullable=True),
        sa.Column("patient_id", S(length=64), nullable=True),
        sa.Column("accession_number", S(length=64), nullable=True),
        sa.ForeignKeyConstraint(["study_id"], ["study.id"]),
        sa.PrimaryKeyConstraint("study_id"),
    )
    # the audit trail is append-only, enforced by the database itself
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            "CREATE FUNCTION review_append_only() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN RAISE EXCEPTION 'review is append-only'; END $$"
        )
        op.execute(
            "CREATE TRIGGER review_append_only BEFORE UPDATE OR DELETE ON review "
            "FOR EACH ROW EXECUTE FUNCTION review_append_only()"
        )
    else:
        for event in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER review_no_{event.lower()} BEFORE {event} ON review "
                "BEGIN SELECT RAISE(ABORT, 'review is append-only'); END"
            )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS review_append_only ON review")
        op.execute("DROP FUNCTION IF EXISTS review_append_only()")
    op.drop_table("study_identity")
    op.drop_index(op.f("ix_review_created_at"), table_name="review")
    op.drop_index(op.f("ix_review_finding_id"), table_name="review")
    op.drop_table("review")
    op.drop_index(op.f("ix_app_user_name"), table_name="app_user")
    op.drop_table("app_user")
    op.drop_index(op.f("ix_structured_report_study_id"), table_name="structured_report")
    op.drop_table("structured_report")
