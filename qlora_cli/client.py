"""HTTP to the service: one `Client` per command; failures are `ApiError` (the API answered
with an error) or `Unreachable` (no answer at all)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
TIMEOUT_S = 60.0
CONNECT_TIMEOUT_S = 10.0


def _version() -> str:
    try:
        return metadata.version("qlora-service")
    except metadata.PackageNotFoundError:
        return "0"


def normalize_url(url: str) -> str:
    """The service's root: a trailing `/` or `/v1` (as the openai SDK's base_url has it) is
    dropped, since every path this client sends starts with `/v1/`."""
    url = url.strip().rstrip("/")
    if url.endswith("/v1"):
        url = url[: -len("/v1")]
    if "://" not in url:
        url = "http://" + url
    return url


def display_url(url: str) -> str:
    """`url` fit to print: no user:password part, no query."""
    parsed = httpx.URL(url)
    return str(parsed.copy_with(username=None, password=None, query=None, fragment=None))


@dataclass
class ApiError(Exception):
    """The API's `{"error": {...}}` answer. `detail` is the whole `error` object: it carries
    the extras some errors have (`lines` of a bad upload, `estimate` of a job too large)."""

    status: int
    code: str | None
    message: str
    param: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    retry_after: str | None = None

    def __str__(self) -> str:
        return f"{self.status} {self.code}: {self.message}"

    def body(self) -> dict[str, Any]:
        """The error as the API sent it (or as close as it can be told)."""
        detail = self.detail or {"message": self.message, "code": self.code, "param": self.param}
        return {"error": {**detail, "status": self.status}}


class Unreachable(Exception):
    """No HTTP answer: refused, unresolvable, timed out, or cut off mid-way."""


def error_from_response(resp: httpx.Response) -> ApiError:
    """Read an error response; it need not be the API's JSON (a proxy's page, say)."""
    retry_after = resp.headers.get("retry-after")
    try:
        body = resp.json()
    except ValueError:
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        return ApiError(
            status=resp.status_code,
            code=str(error["code"]) if error.get("code") is not None else None,
            message=str(error.get("message") or resp.reason_phrase),
            param=str(error["param"]) if error.get("param") is not None else None,
            detail=error,
            retry_after=retry_after,
        )
    return ApiError(
        status=resp.status_code,
        code=None,
        message=resp.reason_phrase or "error",
        retry_after=retry_after,
    )


def describe_transport_error(exc: httpx.TransportError) -> str:
    """Why no answer came, in words; never a header (the API key travels in one)."""
    if isinstance(exc, httpx.ConnectTimeout):
        return "the connection timed out"
    if isinstance(exc, httpx.ConnectError):
        text = str(exc)
        if "refused" in text.lower():
            return "connection refused"
        return f"could not connect ({text.split('] ')[-1][:120]})" if text else "could not connect"
    if isinstance(exc, httpx.TimeoutException):
        return "no answer in time"
    if isinstance(exc, httpx.RemoteProtocolError | httpx.ReadError | httpx.WriteError):
        return "the connection was closed before the answer was complete"
    return f"transport error ({type(exc).__name__})"


class Client:
    """The service's REST API over one connection pool. `transport` is for tests."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        *,
        transport: httpx.BaseTransport | None = None,
        timeout: float = TIMEOUT_S,
    ) -> None:
        self.base_url = normalize_url(base_url)
        headers = {"User-Agent": f"qlora-cli/{_version()}"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self.http = httpx.Client(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=CONNECT_TIMEOUT_S),
            transport=transport,
            follow_redirects=False,
        )

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def unreachable(self, exc: httpx.TransportError) -> Unreachable:
        return Unreachable(
            f"cannot reach the API at {display_url(self.base_url)}: {describe_transport_error(exc)}"
        )

    def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Any:
        """The decoded JSON answer of a 2xx; `ApiError` otherwise."""
        try:
            resp = self.http.request(method, path, json=json, params=params, headers=headers)
        except httpx.TransportError as exc:
            raise self.unreachable(exc) from None
        return decode(resp)

    @contextmanager
    def stream(
        self,
        method: str,
        path: str,
        *,
        content: Any = None,
        headers: Mapping[str, str] | None = None,
        timeout: httpx.Timeout | None = None,
    ) -> Iterator[httpx.Response]:
        """A response whose body is read by the caller; an error answer raises `ApiError`
        and a lost connection (before or while reading) `Unreachable`."""
        extra: dict[str, Any] = {"timeout": timeout} if timeout is not None else {}
        try:
            with self.http.stream(method, path, content=content, headers=headers, **extra) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    raise error_from_response(resp)
                yield resp
        except httpx.TransportError as exc:
            raise self.unreachable(exc) from None


def decode(resp: httpx.Response) -> Any:
    if resp.status_code >= 400:
        raise error_from_response(resp)
    try:
        return resp.json()
    except ValueError:
        raise ApiError(
            status=resp.status_code,
            code="invalid_response",
            message="the API's answer is not JSON (is the URL the service's?)",
        ) from None
