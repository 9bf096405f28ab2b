"""Every error the API gives is JSON `{error, detail}`: `error` a stable slug for programs,
`detail` a sentence for people. Bad input gets a 4xx, never a 5xx or a traceback."""
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.exc import DBAPIError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from learner.audio import AudioError, TooLong
from storage.failures import classify

log = logging.getLogger("emoloop.service")


class ErrorBody(BaseModel):
    error: str
    detail: str


class ApiError(Exception):
    """Raise from a route or dependency to answer with this status and body."""

    def __init__(self, status_code: int, error: str, detail: str,
                 headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status_code, self.error, self.detail = status_code, error, detail
        self.headers = headers


def unauthorized(detail: str) -> ApiError:
    return ApiError(401, "unauthorized", detail, headers={"WWW-Authenticate": "Bearer"})


def not_found(what: str) -> ApiError:
    return ApiError(404, "not_found", f"{what} not found")


def audio_error(err: AudioError) -> ApiError:
    # Too long is a size limit (413); everything else is a clip we cannot use (422).
    return ApiError(413 if isinstance(err, TooLong) else 422, err.code, str(err))


def too_large(limit_bytes: int) -> ApiError:
    return ApiError(413, "file_too_large",
                    f"the upload is larger than the limit of {limit_bytes} bytes")


# What a client is told to wait after a store failure: long enough for a lock holder to finish or
# an operator to react, short enough that recovery is noticed soon.
RETRY_AFTER_S = 5


def storage_failure(err: BaseException) -> ApiError | None:
    """503 (or 507 for a full disk) with Retry-After for a store that cannot take writes now;
    None when `err` is not a store failure."""
    failure = classify(err)
    if failure is None:
        return None
    headers = {"Retry-After": str(RETRY_AFTER_S)}
    if failure.full:
        return ApiError(507, "insufficient_storage", failure.reason, headers=headers)
    return ApiError(503, "storage_unavailable", failure.reason, headers=headers)


def error_response(status_code: int, error: str, detail: str,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail}, status_code=status_code,
                        headers=headers)


# Documented on every route that can answer with them, so /docs and schemathesis know the shape.
ERROR_RESPONSES = {code: {"model": ErrorBody} for code in (400, 401, 403, 404, 413, 422, 503,
                                                           507)}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, err: ApiError) -> JSONResponse:
        return error_response(err.status_code, err.error, err.detail, err.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, err: RequestValidationError) -> JSONResponse:
        errors = err.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return error_response(400, "malformed_json", "the request body is not valid JSON")
        return error_response(422, "validation_error", "; ".join(_describe(e) for e in errors))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
        # Starlette's own answers: unknown path (404), wrong method (405), unparsable body (400).
        slug = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code, "bad_request")
        return error_response(err.status_code, slug, str(err.detail), err.headers)

    # Registered by class, these are answered by Starlette's ExceptionMiddleware, which keeps the
    # connection open; the catch-all below runs in ServerErrorMiddleware, which re-raises after
    # answering, and uvicorn then closes the connection under the client's next request.
    @app.exception_handler(OperationalError)
    @app.exception_handler(DBAPIError)
    @app.exception_handler(OSError)
    async def _store_failure(request: Request, err: Exception) -> JSONResponse:
        failure = storage_failure(err)
        if failure is None:
            log.exception("unhandled error on %s %s", request.method, request.url.path,
                          exc_info=err)
            return error_response(500, "internal_error", "the server failed to answer; see its log")
        log.warning("%s %s: %s", request.method, request.url.path, failure.detail)
        request.app.state.store_probe.failed(failure.detail)  # /ready says so at once
        return error_response(failure.status_code, failure.error, failure.detail, failure.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, err: Exception) -> JSONResponse:
        # A bug, not bad input: log the traceback here, show the client none of it.
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", "the server failed to answer; see its log")


def _describe(error: dict) -> str:
    where = ".".join(str(part) for part in error.get("loc", ()) if part != "body")
    return f"{where}: {error.get('msg', 'invalid')}" if where else error.get("msg", "invalid")
