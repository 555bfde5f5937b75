"""Reading request bodies: a size limit that holds on the stream, and JSON read strictly.

The limit (`MAX_BODY_BYTES`) is enforced in two places, both before routing and authentication:
a declared Content-Length above it is refused without reading a byte, and `limited_receive`
counts the bytes of every `http.request` message as they arrive (chunked or not) and refuses
the request at the first message that crosses it. Nothing past the limit is ever asked for, so a
client streaming 512 MB costs at most the limit plus one transport read. A refused stream's
answer (413) closes the connection: the server stops reading the rest of the body instead of
draining it.

JSON bodies are UTF-8 (RFC 8259 §8.1) and a key appears once per object (§4 leaves duplicates
to the implementation; here the last `action` would silently win):
- another encoding (UTF-16/32, detected as the json module does), a byte order mark, or bytes
  that are not UTF-8 → 400, the body could not be read;
- a repeated key, NaN/Infinity (not JSON), a number out of range or too long to read, nesting
  too deep → 422;
- malformed JSON keeps FastAPI's own 422 (`json_invalid`, with the position).
All of these are raised while FastAPI reads the body, before the endpoint or any dependency
(authentication included) runs: nothing is recorded.
"""

from __future__ import annotations

import json
import math
from typing import Any, Awaitable, Callable

from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.requests import Request

MAX_BODY_BYTES = 2 * 1024 * 1024
_KEY_SHOWN = 40  # characters of a repeated key echoed back (the rest is the client's problem)


class BodyRefused(HTTPException):
    """A body refused while it is read. A Starlette HTTPException, because FastAPI's body reader
    passes those through unchanged (anything else becomes its generic 400)."""

    def __init__(self, status: int, message: str, detail: Any = None, headers: dict[str, str] | None = None):
        super().__init__(status_code=status, detail=message, headers=headers)
        self.message, self.body_detail = message, detail


def too_large() -> BodyRefused:
    # Connection: close — the server then stops reading the rest of the body (uvicorn would
    # otherwise drain it to keep the connection alive).
    return BodyRefused(413, f"the request body is larger than {MAX_BODY_BYTES} bytes ({MAX_BODY_BYTES // 1048576} MiB)",
                       {"limit_bytes": MAX_BODY_BYTES}, headers={"Connection": "close"})


def declared_too_large(headers) -> bool:
    """A Content-Length above the limit (or one that is not a number): refused before reading."""
    for name, value in headers:
        if name == b"content-length":
            try:
                if int(value) > MAX_BODY_BYTES:
                    return True
            except ValueError:
                return True
    return False


def limited_receive(receive: Callable[[], Awaitable[dict]], state: dict) -> Callable[[], Awaitable[dict]]:
    """`receive`, counting body bytes as they arrive; past the limit it raises BodyRefused (413)
    and never calls the server's receive again. state["too_large"] records the refusal."""
    received = 0

    async def _receive() -> dict:
        nonlocal received
        if state.get("too_large"):
            raise too_large()
        message = await receive()
        if message.get("type") == "http.request":
            received += len(message.get("body", b""))
            if received > MAX_BODY_BYTES:
                state["too_large"] = True
                raise too_large()
        return message

    return _receive


# ---------------------------------------------------------------------------------------------
# Strict JSON
# ---------------------------------------------------------------------------------------------


def _no_repeated_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            shown = key if len(key) <= _KEY_SHOWN else key[:_KEY_SHOWN] + "…"
            raise BodyRefused(422, f"the JSON body repeats the key {json.dumps(shown)} in one object",
                              [{"loc": ["body"], "msg": f"duplicate key {json.dumps(shown)}", "type": "duplicate_key"}])
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise BodyRefused(422, f"the JSON body is not valid: {name} is not a JSON number",
                      [{"loc": ["body"], "msg": f"{name} is not a JSON number", "type": "json_invalid"}])


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999: valid JSON syntax, but no number a decision can carry
        raise BodyRefused(422, "the JSON body is not valid: a number is out of range",
                          [{"loc": ["body"], "msg": "number out of range", "type": "json_invalid"}])
    return value


def read_json(raw: bytes) -> Any:
    """The JSON value of a request body, read strictly (see the module docstring)."""
    encoding = json.detect_encoding(raw)
    if encoding != "utf-8":
        what = ("it starts with a byte order mark" if encoding == "utf-8-sig"
                else f"it looks like {encoding.upper()}")
        raise BodyRefused(400, f"the body could not be read: it must be UTF-8 JSON, and {what}",
                          {"reason": "not_utf8", "encoding": encoding})
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BodyRefused(400, f"the body could not be read: byte {exc.start} is not UTF-8 (it must be UTF-8 JSON)",
                          {"reason": "not_utf8", "offset": exc.start}) from None
    try:
        return json.loads(text, object_pairs_hook=_no_repeated_keys, parse_constant=_no_constant,
                          parse_float=_finite)
    except json.JSONDecodeError:
        raise  # FastAPI's own 422 (json_invalid, with the position)
    except RecursionError:
        raise BodyRefused(422, "the JSON body is nested too deeply",
                          [{"loc": ["body"], "msg": "nested too deeply", "type": "json_invalid"}]) from None
    except ValueError:  # e.g. an integer beyond Python's digit limit
        raise BodyRefused(422, "the JSON body is not valid: a number is too long",
                          [{"loc": ["body"], "msg": "number too long", "type": "json_invalid"}]) from None


class StrictJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = read_json(await self.body())
        return self._json


class StrictJSONRoute(APIRoute):
    """An API route whose JSON body is read by `read_json` (FastAPI calls `request.json()`)."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def strict(request: Request):
            return await handler(StrictJSONRequest(request.scope, request.receive, request._send))

        return strict
