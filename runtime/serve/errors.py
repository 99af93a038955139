"""OpenAI-style API errors: ``{"error": {"message", "type", "param", "code"}}`` with an HTTP status.

Every rejection the server makes is an :class:`APIError`; the app turns it into that body (and its
headers, e.g. ``Retry-After`` on 429 or ``WWW-Authenticate`` on 401). The helpers name the common ones
so that status, type and code stay consistent across routes.
"""

from __future__ import annotations

from typing import Any


class APIError(Exception):
    """An HTTP error with an OpenAI error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    """400: a request field is missing, malformed or out of range (nothing is queued)."""
    return APIError(400, message, param=param, code=code)


def not_found(message: str, param: str | None = None, code: str = "not_found") -> APIError:
    return APIError(404, message, param=param, code=code)


def too_large(limit: int) -> APIError:
    return APIError(413, f"request body exceeds the limit of {limit} bytes", code="request_too_large")


def unauthorized(message: str) -> APIError:
    return APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def queue_full(limit: int, retry_after_s: int) -> APIError:
    return APIError(
        429,
        f"the queue is full ({limit} requests waiting); retry after {retry_after_s} s",
        type="rate_limit_error",
        code="queue_full",
        headers={"Retry-After": str(retry_after_s)},
    )


def unavailable(message: str, code: str) -> APIError:
    return APIError(503, message, type="server_error", code=code, headers={"Retry-After": "5"})
