"""One place that turns every failure into `{"error": {"code", "message", "param"}}`."""

from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from shared.errors import ServiceError

log = logging.getLogger("api.errors")

_HTTP_CODES = {
    401: "invalid_api_key",
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
    415: "unsupported_media_type",
}


# pydantic adds the union member it tried to a location: ("n_epochs", "int"), ("x", "literal['a']")
_UNION_TAG = re.compile(r"^(int|float|str|bool|none|[a-z-]+\[.*\])$")


def _error(status: int, code: str, message: str, param: str | None) -> JSONResponse:
    return JSONResponse(
        {"error": {"code": code, "message": message, "param": param}}, status_code=status
    )


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def service_error(_: Request, exc: ServiceError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [
            str(p)
            for p in first.get("loc", ())
            if p not in ("body", "query", "path", "header") and not _UNION_TAG.match(str(p))
        ]
        param = ".".join(loc) or None
        message = (
            f"{param}: {first.get('msg', 'invalid value')}" if param else str(first.get("msg"))
        )
        return _error(422, "invalid_value", message, param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        return _error(exc.status_code, code, str(exc.detail), None)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return _error(500, "internal_error", "internal server error", None)
