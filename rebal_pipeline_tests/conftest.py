import os

import pytest
from dagster import instance_for_test

from rebal_pipeline_tests.feedkit import Workspace

# The audit chain is signed with a key from the environment (workflow/audit.py): every test (and
# every process a test starts) signs with this test key unless the test sets its own.
os.environ.setdefault("REBAL_AUDIT_KEY", "rebal-tests-audit-key-0123456789abcdef-not-a-secret")


@pytest.fixture
def workspace(tmp_path) -> Workspace:
    return Workspace(tmp_path)


@pytest.fixture(scope="module")
def module_workspace(tmp_path_factory) -> Workspace:
    return Workspace(tmp_path_factory.mktemp("rebal"))


@pytest.fixture(scope="module")
def dagster_instance():
    with instance_for_test() as instance:
        yield instance
