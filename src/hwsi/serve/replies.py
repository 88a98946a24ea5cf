"""Replies of `hwsi serve` that cannot fail to be sent, whatever the request held.

* :class:`AsciiJSONResponse`: every JSON reply is ASCII (non-ASCII escaped), so any str a request can carry — a
  lone surrogate is valid JSON but not UTF-8 — encodes, also when a 422 echoes it back;
* :func:`install_error_handlers`: 422 (a body that is not UTF-8 echoed with U+FFFD), HTTP errors and unexpected
  errors as such replies, never a traceback;
* :func:`url_id`: an id as one URL path segment (``#``, ``%``, ``/``, ``?``, non-ASCII percent-encoded);
* :func:`attachment`: a Content-Disposition whose ``filename`` is ASCII plus an RFC 6266/5987 UTF-8 ``filename*``
  (a header must be Latin-1; an id like ``片`` is not).
"""

from __future__ import annotations

import json
import logging
from typing import Any
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("hwsi.serve")


class AsciiJSONResponse(JSONResponse):
    """JSON with every non-ASCII character escaped: any str a request can carry (a lone surrogate is valid JSON
    but not UTF-8) encodes, so an error reply that echoes the input never fails itself."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def _utf8(text: str) -> bytes:
    """UTF-8 of ``text``; a file name that is not UTF-8 (surrogate-escaped by Python) gives back its own bytes."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass")


def url_id(slide_id: str) -> str:
    """``slide_id`` as one URL path segment (``#``, ``%``, ``/``, ``?`` and non-ASCII percent-encoded)."""
    return quote(_utf8(slide_id), safe="")


def attachment(filename: str) -> str:
    """A Content-Disposition for ``filename``: ASCII ``filename`` (others → ``_``) + RFC 5987 UTF-8 ``filename*``."""
    ascii_name = "".join(c if 32 <= ord(c) < 127 and c not in '"\\%;' else "_" for c in filename)
    utf8 = quote(_utf8(filename), safe="")
    return f'attachment; filename="{ascii_name}"; filename*=UTF-8\'\'{utf8}'


def install_error_handlers(app: FastAPI) -> None:
    """Validation errors, HTTP errors and unexpected errors of ``app`` as ASCII JSON (no traceback in a reply)."""

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = jsonable_encoder(exc.errors(), custom_encoder={bytes: lambda b: b.decode("utf-8", "replace")})
        return AsciiJSONResponse({"detail": errors}, status_code=422)  # a body that is not UTF-8 is echoed too

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code in (204, 304):
            return Response(status_code=exc.status_code, headers=exc.headers)
        return AsciiJSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:  # never leak a traceback
        log.exception("unexpected error on %r", request.url.path)
        return AsciiJSONResponse({"detail": f"internal error: {type(exc).__name__}"}, status_code=500)
