"""The service's error hierarchy. Each class carries its HTTP status and a stable `code`;
one FastAPI handler renders them all as `{"error": {"code", "message", "param"}}`."""

from __future__ import annotations

from typing import Any


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

    def body(self) -> dict[str, Any]:
        return {
            "error": {"code": self.code, "message": self.message, "param": self.param, **self.extra}
        }


class BadRequest(ServiceError):
    status_code = 400


class Unauthorized(ServiceError):
    status_code = 401
    code = "invalid_api_key"


class NotFound(ServiceError):
    status_code = 404
    code = "not_found"


class Conflict(ServiceError):
    status_code = 409
    code = "conflict"


class TooLarge(ServiceError):
    status_code = 413
    code = "file_too_large"


class Invalid(ServiceError):
    status_code = 422
    code = "invalid_value"


class RateLimited(ServiceError):
    status_code = 429
    code = "rate_limit_exceeded"


class Unavailable(ServiceError):
    status_code = 503
    code = "unavailable"
