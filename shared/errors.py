"""The service's error hierarchy. Each class carries its HTTP status, OpenAI's error `type` for
that status and a stable `code`; one FastAPI handler renders them all as OpenAI does:
`{"error": {"message", "type", "param", "code", ...extra}}` (see docs/errors.md)."""

from __future__ import annotations

from typing import Any

# Codes a pydantic validator raises as `PydanticCustomError(code, message)`: the API reports
# such an error with that code (and the top-level field as `param`) instead of `invalid_value`.
SCHEMA_ERROR_CODES = frozenset({"invalid_metadata"})

INVALID_REQUEST = "invalid_request_error"
SERVER_ERROR = "server_error"
# OpenAI names the limit that was hit: `requests` for a count of requests (`tokens` for tokens).
RATE_LIMIT = "requests"


def error_type(status: int) -> str:
    """OpenAI's `error.type` for an HTTP status: every 4xx but 429 is `invalid_request_error`
    (401 and 404 included), 429 names the limit, 5xx are `server_error`."""
    if status == 429:
        return RATE_LIMIT
    if status >= 500:
        return SERVER_ERROR
    return INVALID_REQUEST


def error_body(
    *, message: str, code: str | None, param: str | None, status: int, **extra: Any
) -> dict[str, Any]:
    """The one error shape; `extra` (e.g. `lines`, `estimate`) travels inside `error`."""
    return {
        "error": {
            "message": message,
            "type": error_type(status),
            "param": param,
            "code": code,
            **extra,
        }
    }


class ServiceError(Exception):
    status_code = 400
    code = "invalid_request"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        extra: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.extra = extra or {}
        self.headers = headers or {}

    @property
    def type(self) -> str:
        return error_type(self.status_code)

    def body(self) -> dict[str, Any]:
        return error_body(
            message=self.message,
            code=self.code,
            param=self.param,
            status=self.status_code,
            **self.extra,
        )


class BadRequest(ServiceError):
    status_code = 400


class Invalid(BadRequest):
    """A request the service understood but refuses (a value out of range, a file of the wrong
    purpose, ...): 400 like any invalid request, as OpenAI answers; never 422."""

    code = "invalid_value"


class Unauthorized(ServiceError):
    status_code = 401
    code = "invalid_api_key"


class Forbidden(ServiceError):
    status_code = 403
    code = "permission_denied"


class NotFound(ServiceError):
    status_code = 404
    code = "not_found"


class Conflict(ServiceError):
    status_code = 409
    code = "conflict"


class TooLarge(ServiceError):
    status_code = 413
    code = "file_too_large"


class RateLimited(ServiceError):
    status_code = 429
    code = "rate_limit_exceeded"


class Unavailable(ServiceError):
    status_code = 503
    code = "unavailable"
