"""Custodian connections (SFTP file pulls, OAuth APIs) - transport only, no Dagster."""
