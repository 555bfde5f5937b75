"""Tests of the custodian connections."""
