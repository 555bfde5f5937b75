"""The custodian connections' job and sensors, for definitions.py to assemble.

Resources they need (already in resources.local_resources()): `workflow_store`. feed_arrivals
targets the daily_drift_scan job by name: definitions.py must hold it (it does, with the schedule).
"""

from rebal_pipeline.defs.connections.jobs import pull_custodian_files
from rebal_pipeline.defs.connections.sensors import custodian_api_pulls, custodian_files, feed_arrivals, feed_deadlines

jobs = [pull_custodian_files]
sensors = [feed_deadlines, custodian_files, custodian_api_pulls, feed_arrivals]
