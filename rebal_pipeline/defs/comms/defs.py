"""The comms jobs and sensors, for definitions.py to assemble.

Resources they need (all chosen by resources.resources_for): `workflow_store`, `warehouse`, and
what the messages are sent with: `email` (SMTP relay, firm name, confirmation style), `crm`,
`links` (secret, public URL, lifetime), `approval_clock` and `drift_policy_source`.
"""

from rebal_pipeline.defs.comms.jobs import communicate_execution, send_advisor_alert, send_notification
from rebal_pipeline.defs.comms.sensors import (
    advisor_alerts, executed_recommendations, mailer_outbox, operations_alerts, outbound_retries,
)

jobs = [send_advisor_alert, send_notification, communicate_execution]
sensors = [advisor_alerts, mailer_outbox, operations_alerts, executed_recommendations, outbound_retries]
