import pytest
from dagster import instance_for_test

from rebal_pipeline_tests.feedkit import Workspace


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
