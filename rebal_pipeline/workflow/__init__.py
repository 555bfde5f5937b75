"""The workflow store: recommendations, decisions, escalations, users and the audit chain.

Relational and transactional (SQLAlchemy): the approval API, the sensors and the runs touch it
concurrently, which DuckDB (one writer process) cannot serve. Embedded default: a SQLite file
under REBAL_HOME; production: Postgres via REBAL_WORKFLOW_DB_URL.
"""
