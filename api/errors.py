"""One place that turns every failure into OpenAI's error shape,
`{"error": {"message", "type", "param", "code"}}` (see docs/errors.md)."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from shared.errors import SCHEMA_ERROR_CODES, ServiceError, error_body
from shared.storage import StoreUnavailable

log = logging.getLogger("api.errors")

_HTTP_CODES = {
    400: "invalid_request",
    401: "invalid_api_key",
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
    415: "unsupported_media_type",
}
STORE_RETRY_AFTER_S = 5
# Conflicts a retry can resolve (a concurrent request finishing); every other 409 is final.
RETRYABLE_CONFLICTS = frozenset({"idempotency_key_in_flight", "job_changed"})


# pydantic adds the union member it tried to a location: ("n_epochs", "int"), ("x", "literal['a']"),
# ("n_epochs", "constrained-int")
_UNION_TAG = re.compile(r"^(int|float|str|bool|none|constrained-[a-z]+|[a-z-]+\[.*\])$")


def error_response(
    status: int,
    code: str,
    message: str,
    param: str | None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(
        error_body(message=message, code=code, param=param, status=status),
        status_code=status,
        headers=headers,
    )


def _unparsable_body(cause: BaseException) -> str:
    """What was wrong with a JSON body that `json.loads` refused with something other than a
    `JSONDecodeError` (those are `RequestValidationError`s). Never the exception's own text."""
    if isinstance(cause, RecursionError):
        return "the request body is not valid JSON: it is nested too deeply"
    if isinstance(cause, UnicodeDecodeError):
        return f"the request body is not valid UTF-8 (byte {cause.start})"
    if isinstance(cause, ValueError) and "digits" in str(cause):
        return "the request body is not valid JSON: a number has too many digits"
    return "the request body is not valid JSON"


def _validation_body(exc: RequestValidationError) -> tuple[str, str, str | None]:
    """(code, message, param) of the first error pydantic reported."""
    first: dict[str, Any] = exc.errors()[0] if exc.errors() else {}
    if first.get("type") == "json_invalid":
        reason = (first.get("ctx") or {}).get("error", "invalid JSON")
        return "invalid_json", f"the request body is not valid JSON: {reason}", None
    loc = [
        str(p)
        for p in first.get("loc", ())
        if p not in ("body", "query", "path", "header") and not _UNION_TAG.match(str(p))
    ]
    message = str(first.get("msg", "invalid value"))
    if first.get("type") in SCHEMA_ERROR_CODES:
        param = loc[0] if loc else None
        return str(first["type"]), f"{param}: {message}" if param else message, param
    param = ".".join(loc) or None
    return "invalid_value", f"{param}: {message}" if param else message, param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def service_error(_: Request, exc: ServiceError) -> JSONResponse:
        headers = dict(exc.headers or {})
        if exc.status_code == 409 and exc.code not in RETRYABLE_CONFLICTS:
            # The OpenAI SDK retries a 409 twice by default; this one cannot change by waiting.
            headers.setdefault("x-should-retry", "false")
        return JSONResponse(exc.body(), status_code=exc.status_code, headers=headers or None)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        # OpenAI answers an invalid request with 400 (the SDK's BadRequestError), never 422.
        code, message, param = _validation_body(exc)
        return error_response(400, code, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and exc.__cause__ is not None:
            # FastAPI's "There was an error parsing the body": json.loads raised something
            # other than a JSONDecodeError (an integer over Python's digit limit, a nesting
            # deeper than the recursion limit, bytes that are not UTF-8).
            return error_response(400, "invalid_json", _unparsable_body(exc.__cause__), None)
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail), None, exc.headers)

    @app.exception_handler(StoreUnavailable)
    async def store_unavailable(request: Request, exc: StoreUnavailable) -> JSONResponse:
        log.warning("object store unavailable on %s %s: %s", request.method, request.url.path, exc)
        return error_response(
            503,
            "store_unavailable",
            "the object store is unavailable; retry later",
            None,
            {"Retry-After": str(STORE_RETRY_AFTER_S)},
        )

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", "internal server error", None)
