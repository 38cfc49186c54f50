"""OpenAI-shaped errors: every refusal is `{"error": {"message", "type", "param", "code"}}`.

`ApiError` is raised by the routes; the handlers installed by `install_error_handlers` turn it,
FastAPI's own validation errors, Starlette's 404/405 and anything unexpected into that shape,
so no client ever sees an HTML page or a bare traceback.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException

__all__ = ["ApiError", "error_response", "install_error_handlers", "validation_message"]

_log = logging.getLogger("moe_infinity.server")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 413: "invalid_request_error",
          415: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable"}


class ApiError(Exception):
    """A refusal with its HTTP status.

    Attributes:
        status: The HTTP status.
        message: One line for the client.
        param: The offending field, if one.
        code: A short machine-readable code.
        headers: Extra response headers (`Retry-After`).
    """

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}


def error_response(status: int, message: str, param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None
                   ) -> JSONResponse:
    """The JSON response of an error."""
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def validation_message(exc: ValidationError | RequestValidationError) -> tuple[str, str | None]:
    """`(message, param)` for the first problem of a validation error."""
    errors = exc.errors()
    if not errors:
        return "invalid request body", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    # Union members add their type name to the location (`prompt.str`); keep the field path.
    path = [p for p in loc if not p.startswith(("str", "list[", "int", "function-"))]
    param = ".".join(path) or None
    message = str(first.get("msg", "invalid value"))
    return (f"{param}: {message}" if param else message), param


def install_error_handlers(app: FastAPI) -> None:
    """Make every error response of `app` OpenAI-shaped."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(exc)
        return error_response(400, message, param, "invalid_value")

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        headers = dict(exc.headers) if exc.headers else None
        return error_response(exc.status_code, str(exc.detail), None, None, headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        _log.exception("unexpected error serving %s", request.url.path)
        return error_response(500, "internal server error", None, "internal_error")
