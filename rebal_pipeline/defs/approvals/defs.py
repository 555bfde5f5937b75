"""The approval workflow's jobs and sensors, for definitions.py to assemble.

Resources they need (already in resources.local_resources()): `workflow_store`, `warehouse`.
"""

from rebal_pipeline.defs.approvals.jobs import execute_rebalance, notify_recommendation
from rebal_pipeline.defs.approvals.sensors import approval_decisions, approval_escalations, market_event_batches

jobs = [execute_rebalance, notify_recommendation]
sensors = [approval_decisions, approval_escalations, market_event_batches]
