"""rebal's own warnings reach the run's logs in the Dagster UI (python_logs in both shipped instance configs)."""

import logging
import shutil
from pathlib import Path

import yaml
from dagster import DagsterInstance, job, op

from rebal_pipeline import settings

SHIPPED = [settings.REPO_ROOT / "dagster.yaml", settings.REPO_ROOT / "rebal_pipeline" / "instance" / "local_dagster.yaml"]


@op
def warns_like_the_mailer():
    logging.getLogger("rebal.comms.smtp").warning("SMTP relay refused the connection; retrying later")
    logging.getLogger("rebal_pipeline.connections.sftp").warning("host key of sftp.example.com checked")


@job
def a_run_that_warns():
    warns_like_the_mailer()


def test_a_rebal_warning_is_in_the_run_log(tmp_path):
    shutil.copy(SHIPPED[1], tmp_path / "dagster.yaml")
    with DagsterInstance.from_config(str(tmp_path)) as instance:
        result = a_run_that_warns.execute_in_process(instance=instance)
        messages = [e.message for e in instance.all_logs(result.run_id) if e.level == logging.WARNING]
    assert "SMTP relay refused the connection; retrying later" in messages
    assert "host key of sftp.example.com checked" in messages


def test_both_shipped_instances_manage_every_rebal_logger():
    import rebal_pipeline.definitions  # noqa: F401  (imports every module that makes a logger)

    names = [n for n in logging.root.manager.loggerDict if n.startswith("rebal")]
    assert names
    for path in SHIPPED:
        managed = yaml.safe_load(Path(path).read_text())["python_logs"]["managed_python_loggers"]
        assert all(any(n == m or n.startswith(m + ".") for m in managed) for n in names), (path, names)
