-- Prefect's own database beside nightread's (both keep an Alembic `alembic_version` table); run once by the
-- postgres image on an empty data folder (/docker-entrypoint-initdb.d), as POSTGRES_USER, who owns it.
CREATE DATABASE prefect;
