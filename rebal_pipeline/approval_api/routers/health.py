"""GET /health: the service answers and its workflow store is reachable."""
from __future__ import annotations

from sqlalchemy import text

from rebal_pipeline.approval_api.dependencies import Store
from rebal_pipeline.approval_api.errors import _E
from rebal_pipeline.approval_api.models import Health
from rebal_pipeline.approval_api.routers import api_router

router = api_router()


@router.get("/health", response_model=Health, tags=["service"],
            responses={503: {**_E, "description": "the workflow store is unreachable"}})
def health(store: Store) -> Health:
    with store.begin() as conn:
        conn.execute(text("select 1"))
    return Health(status="ok", store=store.dialect)
