"""The labelling web app (FastAPI): one static page plus a small JSON API over a `FeedbackStore`.

  GET  /                      the page (static HTML + JS; all item text is set with textContent)
  GET  /api/health            liveness, no token needed, reveals nothing
  POST /api/next              {"labeller": N} -> the next item for N (leased to N):
                              {"item": {"id","prompt","a","b"} | null, "progress"}
  POST /api/vote              {"vote_id","item_id","labeller","choice": A|B|tie|skip, "rating"?: 1-7,
                              "note"?: str} -> 201 stored, 200 when vote_id was already stored
  GET  /api/progress?labeller=N

Safety: on a loopback address only loopback Host headers are accepted (no DNS rebinding); on any other
address a token is required (`create_app` refuses to build without one) and every /api/ call but health
must send it as `X-Label-Token` or `Authorization: Bearer`. Item text only ever leaves as JSON, and the
page is served with a Content-Security-Policy that forbids inline script. Calls that change state are POSTs
with a JSON body, which a cross-site <img>, link or form cannot send. Request bodies are capped at MAX_BODY
bytes (413, checked on Content-Length and while a body without one streams in) and validation replies at
MAX_ERRORS errors of bounded length, so one request cannot make the server read or write megabytes.
"""

import hmac
import ipaddress
import secrets
from pathlib import Path
from typing import Literal, Optional

from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, StrictInt
from starlette.middleware.trustedhost import TrustedHostMiddleware

from rlhf_ext.label.store import FeedbackStore, StoreError

STATIC_DIR = Path(__file__).parent / "static"
# letters/digits of any script, space and . _ @ + -; 1-64 characters
LABELLER_PATTERN = r"^[\w.@+ -]{1,64}$"
VOTE_ID_PATTERN = r"^[A-Za-z0-9_-]{8,64}$"
MAX_NOTE = 2000
MAX_BODY = 64 * 1024  # bytes; a vote is well under 3 KiB
MAX_ERRORS = 10  # validation errors listed in a 422 reply
MAX_ERROR_TEXT = 200  # characters of each field name and message in it
LOOPBACK_HOSTS = ["127.0.0.1", "localhost", "::1", "[::1]"]
_SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and 'localhost'; the only addresses served without a token."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: may resolve anywhere


def resolve_token(host: str, token: Optional[str]):
    """The token the server will require: the given one, a fresh random one when bound beyond loopback
    without one, or None on loopback. Returns (token, generated)."""
    if token is not None:
        if len(token) < 8:
            raise ValueError(f"--token must be at least 8 characters, got {len(token)}")
        return token, False
    if is_loopback(host):
        return None, False
    return secrets.token_urlsafe(18), True


class VoteIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    vote_id: str = Field(pattern=VOTE_ID_PATTERN, description="client-made idempotency key, one per shown item")
    item_id: str = Field(min_length=1, max_length=200)
    labeller: str = Field(pattern=LABELLER_PATTERN)
    choice: Literal["A", "B", "tie", "skip"]
    rating: Optional[StrictInt] = Field(default=None, ge=1, le=7)
    note: str = Field(default="", max_length=MAX_NOTE)


class NextIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    labeller: str = Field(pattern=LABELLER_PATTERN)


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes gets 413 without being read: refused up front on its
    Content-Length, or cut off once a streamed (chunked) body passes the limit."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def _refuse(self, send):
        body = b'{"error": "request body too large (limit %d bytes)"}' % self.limit
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await self._refuse(send)
        received, refused = 0, False

        async def limited_receive():
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:  # answer now; the app sees a client that went away
                    refused = True
                    await self._refuse(send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            if not refused:  # after our 413 the app's own reply is dropped
                await send(message)

        await self.app(scope, limited_receive, guarded_send)


def create_app(
    store: FeedbackStore, *, k: int = 1, host: str = "127.0.0.1", token: Optional[str] = None, allowed_hosts=None
) -> FastAPI:
    """Build the app. `k`: labellers asked per item. `host`: the address it will be bound to, which decides
    the safety rules above. `allowed_hosts`: Host headers accepted on loopback (default LOOPBACK_HOSTS)."""
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if token is None and not is_loopback(host):
        raise ValueError(f"host {host!r} is not a loopback address: a token is required (see resolve_token)")

    app = FastAPI(title="rlhf-ext label", docs_url=None, redoc_url=None, openapi_url=None)
    if is_loopback(host):
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts or LOOPBACK_HOSTS)

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        for name, value in _SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        return response

    app.add_middleware(BodyLimit, limit=MAX_BODY)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        details = [
            {"field": ".".join(str(p) for p in err["loc"])[:MAX_ERROR_TEXT], "message": err["msg"][:MAX_ERROR_TEXT]}
            for err in errors[:MAX_ERRORS]
        ]
        summary = "; ".join(f"{d['field']}: {d['message']}" for d in details)
        if len(errors) > MAX_ERRORS:
            summary += f"; and {len(errors) - MAX_ERRORS} more"
        return JSONResponse(status_code=422, content={"error": f"invalid request: {summary}", "details": details})

    @app.exception_handler(StoreError)
    async def refused(request: Request, exc: StoreError):
        return JSONResponse(status_code=exc.status, content={"error": str(exc)})

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return JSONResponse(status_code=exc.status_code, content={"error": exc.detail}, headers=exc.headers)

    def check_token(
        x_label_token: Optional[str] = Header(default=None), authorization: Optional[str] = Header(default=None)
    ):
        if token is None:
            return
        sent = x_label_token
        if sent is None and authorization and authorization.lower().startswith("bearer "):
            sent = authorization[7:].strip()
        if sent is None:
            raise HTTPException(
                401,
                "this server needs a token: send it as X-Label-Token (open the page with ?token=... in its address)",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if not hmac.compare_digest(sent.encode(), token.encode()):
            raise HTTPException(403, "wrong token")

    labeller_query = Query(pattern=LABELLER_PATTERN, description="labeller name")

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/api/health")
    def health():
        return {"ok": True}

    @app.post("/api/next", dependencies=[Depends(check_token)])
    def next_item(body: NextIn):
        labeller = body.labeller
        served = store.next_item(labeller, k)
        item = None
        if served is not None:
            row, swapped = served
            first, second = (
                (row["completion_b"], row["completion_a"]) if swapped else (row["completion_a"], row["completion_b"])
            )
            item = {"id": row["id"], "prompt": row["prompt"], "a": first, "b": second}
        return {"item": item, "progress": store.progress(labeller, k)}

    @app.get("/api/progress", dependencies=[Depends(check_token)])
    def progress(labeller: str = labeller_query):
        return store.progress(labeller, k)

    @app.post("/api/vote", dependencies=[Depends(check_token)])
    def vote(body: VoteIn):
        stored, duplicate = store.record_human_vote(
            body.vote_id, body.item_id, body.labeller, body.choice, rating=body.rating, note=body.note
        )
        content = {
            "stored": not duplicate,
            "duplicate": duplicate,
            "vote_id": stored["vote_id"],
            "progress": store.progress(body.labeller, k),
        }
        return JSONResponse(status_code=200 if duplicate else 201, content=content)

    return app
