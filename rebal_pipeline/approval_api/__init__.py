"""The approval API (FastAPI): advisors' pending recommendations, decisions, batch review sessions
and one-click email links, over the workflow store. OpenAPI at /openapi.json.

    python -m rebal_pipeline.approval_api --host 127.0.0.1 --port 8000
    (REBAL_LINK_SECRET required, >= 32 bytes; REBAL_WORKFLOW_DB_URL optional)
"""

from rebal_pipeline.approval_api.app import create_app, serve, utcnow
from rebal_pipeline.approval_api.links import LinkClaims, LinkError, issue_links, make_link_token, read_link_token

__all__ = ["create_app", "serve", "utcnow", "make_link_token", "read_link_token", "issue_links", "LinkClaims",
           "LinkError"]
