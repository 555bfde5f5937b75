"""The custodian pull job: one connection's new files (SFTP) or day (OAuth API) pulled, archived,
translated into its part and assembled into the day's canonical feed (connections/pull.py).
Launched by the custodian_files and custodian_api_pulls sensors (defs/connections/sensors.py)."""

from dagster import Config, Failure, OpExecutionContext, job, op

from rebal_pipeline.core.clock import run_time
from rebal_pipeline import settings
from rebal_pipeline.connections import pull
from rebal_pipeline.connections.config import connections_file, load_connections
from rebal_pipeline.resources import WorkflowStoreResource


class PullConfig(Config):
    connection: str
    as_of: str = ""  # the day to pull (API connections); SFTP pulls whatever is new
    now: str = ""    # the requesting tick's time (tests inject a clock); empty = now


@op(description="Pull a connection's new files (SFTP) or the day's pages (OAuth API), archive the raw input, "
                "translate it into the connection's part and assemble the day's canonical feed.")
def pull_connection(context: OpExecutionContext, config: PullConfig, workflow_store: WorkflowStoreResource):
    current = settings.current()
    try:
        deliveries = pull.pull_connection(
            config.connection, config.as_of, connections=load_connections(connections_file(current)),
            feed_root=current.feed_root(), clock=lambda: run_time(config.now), open_store=workflow_store.open)
    except pull.UnknownConnection as unknown:
        raise Failure(description=str(unknown)) from None
    except pull.ReauthorizationPending as pending:
        context.log.error(pending.log_line)
        raise Failure(description=pending.alert_message) from None
    for delivery in deliveries:
        context.log.info(pull.describe(delivery))
    if not deliveries:
        context.log.info(f"{config.connection}: nothing new to translate")
    context.add_output_metadata(pull.pull_summary(deliveries))
    return [d.as_of.isoformat() for d in deliveries]


@job(description="Pull a custodian connection's data and assemble the day's canonical feed.")
def pull_custodian_files():
    pull_connection()


jobs = [pull_custodian_files]
