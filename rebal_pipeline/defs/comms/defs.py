"""The comms jobs and sensors, for definitions.py to assemble.

Resources they need (already in resources.local_resources()): `workflow_store`, `warehouse`.
Settings (SMTP relay, link secret, public URL, CRM) come from the environment at send time: see
defs/comms/jobs.py.
"""

from rebal_pipeline.defs.comms.jobs import communicate_execution, send_advisor_alert, send_notification
from rebal_pipeline.defs.comms.sensors import (
    advisor_alerts, executed_recommendations, mailer_outbox, operations_alerts, outbound_retries,
)

jobs = [send_advisor_alert, send_notification, communicate_execution]
sensors = [advisor_alerts, mailer_outbox, operations_alerts, executed_recommendations, outbound_retries]
