"""The approval API's routers, included by create_app in this order (the order is the route
table's: GET, form POST and JSON POST /links/{token} must stay together, in that order)."""
from __future__ import annotations

from fastapi import APIRouter

from rebal_pipeline.approval_api.errors import AsciiJSONResponse
from rebal_pipeline.approval_api.request_body import StrictJSONRoute


def api_router() -> APIRouter:
    """A router whose routes read JSON bodies strictly (request_body.read_json) and answer ASCII JSON."""
    return APIRouter(route_class=StrictJSONRoute, default_response_class=AsciiJSONResponse)
