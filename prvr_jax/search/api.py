"""The search service's HTTP API and page: a FastAPI app over a loaded SearchEngine.

Routes (JSON unless said otherwise):
  GET  /                      the search page (prvr_jax/search/web/, no build step, no CDN)
  GET  /static/{name}         its script, style sheet and icon (a fixed list; nothing else)
  GET  /healthz               {status, videos, model, index, index_generation, search (mode,
                              nprobe, candidates), limits, batching, thumbnails, ...}
  GET  /api/search?q=..&k=..  {query, k, hits: [hit...], timing}
  POST /api/search            body {"queries": [...], "k": K} -> {k, results: [{query, hits}], timing}
  GET  /api/videos/{id}       {video_id, duration, video_url, moments: the moments of the last
                              search that returned this video, each with its query}
  GET  /videos/{id}           the video file (HTTP range requests), with --videos only
  GET  /thumbnails/{id}?t=S   JPEG of the frame shown at S seconds, with --videos only

A hit has the fields of the CLI's JSON lines (query, rank, video_id, score, clip_score,
frame_score, start, end, branch) plus, when the service has --videos, `video_url` and
`thumbnail_url` (paths on this server; null for a video without a servable file).

Errors: a bad request (unknown route or id, a missing / empty / too long query, k out of range,
too many queries, a body that is not the JSON asked for or too large, an unsatisfiable range, ...)
raises a `PrvrError` (`ApiError` here, `NotServed` from media.py, ...) and is answered 4xx with
{"error": "<what was wrong>"}, nothing logged. Any other exception is a bug: answered 500 with
{"error": "internal error while answering <path>: <type>"}, its traceback logged by uvicorn
("Exception in ASGI application", logger uvicorn.error) and never sent. Every response carries a
strict Content-Security-Policy (the page loads nothing from elsewhere).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import pathlib
import urllib.parse
from typing import Any, AsyncIterator, Optional

import fastapi
import pydantic
import starlette.exceptions
from fastapi import Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response

from prvr_jax.errors import PrvrError
from prvr_jax.search.batcher import QueryBatcher
from prvr_jax.search.errors import SearchError
from prvr_jax.search.media import NotServed, VideoLibrary
from prvr_jax.search.query import Hit, hit_line
from prvr_jax.search.responses import ResponsePolicy
from prvr_jax.search.service import SearchEngine

WEB_DIR = pathlib.Path(__file__).parent / "web"
# The page's files: name -> media type. Nothing else under web/ (or anywhere) is served.
ASSETS = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8",
          "favicon.svg": "image/svg+xml"}
DEFAULT_K = 10
_LOG = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Limits:
  """What one request may ask for.

  Attributes:
    max_query_chars: characters of one query text (after stripping spaces).
    max_k: results per query.
    max_batch: queries per POST request, and per encoder call (requests share calls).
    max_wait_ms: how long a request waits for others to share its encoder call.
    max_body_bytes: size of a POST body.
    max_connections: concurrent connections; more are answered 503 by uvicorn.
  """

  max_query_chars: int = 1000
  max_k: int = 50
  max_batch: int = 32
  max_wait_ms: float = 5.0
  max_body_bytes: int = 256 * 1024
  max_connections: int = 256


class ApiError(PrvrError):
  """A request the service refuses: answered with `status` (4xx) and {"error": message}.

  The one 5xx: a servable video file that cannot be decoded (500; the operator's file to fix,
  named in the server's log).
  """

  def __init__(self, status: int, message: str):
    super().__init__(message)
    self.status, self.message = status, message


class BatchRequest(pydantic.BaseModel):
  """The body of POST /api/search."""

  model_config = pydantic.ConfigDict(extra="forbid")
  queries: list[str]
  k: int = DEFAULT_K


def _describe(errors: list[dict[str, Any]], where: str = "") -> str:
  """Pydantic / FastAPI validation errors in words: 'query parameter k: Input should be ...'."""
  parts = []
  for e in errors:
    loc = [str(x) for x in e.get("loc", ())]
    if loc and loc[0] in ("query", "path", "body"):
      kind = {"query": "query parameter", "path": "path parameter", "body": "body field"}[loc[0]]
      loc = loc[1:]
    else:
      kind = where
    name = ".".join(loc)
    parts.append(f"{kind} {name}: {e.get('msg')}".strip() if name else f"{kind}: {e.get('msg')}")
  return "; ".join(parts)


class LastMoments:
  """The moments of the last search that returned each video (for /api/videos/{id})."""

  def __init__(self):
    self._by_video: dict[str, list[dict[str, Any]]] = {}

  def remember(self, results: list[list[Hit]]) -> None:
    """Records one request's results (its queries' hits, each list cut to the request's k)."""
    fresh: dict[str, list[dict[str, Any]]] = {}
    for hits in results:
      for h in hits:
        fresh.setdefault(h.video_id, []).append(
            {key: value for key, value in hit_line(h).items() if key != "video_id"})
    self._by_video.update(fresh)  # handlers run on the event loop: no other writer meanwhile

  def of(self, video_id: str) -> list[dict[str, Any]]:
    return self._by_video.get(video_id, [])


def _quote(video_id: str) -> str:
  return urllib.parse.quote(video_id, safe="")


def _status(e: PrvrError) -> int:
  """The HTTP status of a user error: its own (ApiError), 404 for an id with no servable file, else
  422 (the request's content cannot be used)."""
  if isinstance(e, ApiError):
    return e.status
  return 404 if isinstance(e, NotServed) else 422


async def _user_error(_request: Request, e: PrvrError) -> JSONResponse:
  return JSONResponse({"error": str(e)}, status_code=_status(e))


async def _validation_error(_request: Request, e: RequestValidationError) -> JSONResponse:
  return JSONResponse({"error": _describe(list(e.errors()))}, status_code=422)


async def _http_error(request: Request, e: starlette.exceptions.HTTPException) -> JSONResponse:
  message = {404: f"not found: {request.url.path}",
             405: f"method {request.method} not allowed on {request.url.path}"}
  return JSONResponse({"error": message.get(e.status_code, str(e.detail))},
                      status_code=e.status_code, headers=getattr(e, "headers", None))


async def _internal_error(request: Request, e: Exception) -> JSONResponse:
  # Starlette raises `e` again after this answer: uvicorn logs it with its traceback (the client
  # gets the route and the type only).
  return JSONResponse({"error": f"internal error while answering {request.url.path}: "
                                f"{type(e).__name__}"}, status_code=500)


async def _read_body(request: Request, limit: int) -> bytes:
  """The request body, refused (413) past `limit` bytes, declared or sent."""
  declared = request.headers.get("content-length")
  if declared is not None and (not declared.isdigit() or int(declared) > limit):
    raise ApiError(413, f"body: {declared} bytes declared, the limit is {limit}")
  body = b""
  async for part in request.stream():
    body += part
    if len(body) > limit:
      raise ApiError(413, f"body: more than the limit of {limit} bytes")
  return body


class SearchApi:
  """The routes' handlers over one engine, its videos and its limits."""

  def __init__(self, engine: SearchEngine, library: Optional[VideoLibrary], limits: Limits):
    if limits.max_batch != engine.max_batch or limits.max_k != engine.max_k:
      raise ValueError(f"limits ({limits.max_batch}, {limits.max_k}) differ from the engine's "
                       f"({engine.max_batch}, {engine.max_k})")
    self.engine, self.library, self.limits = engine, library, limits
    self.page = (WEB_DIR / "index.html").read_bytes()
    self.assets = {name: (WEB_DIR / name).read_bytes() for name in ASSETS}
    self.moments = LastMoments()
    self.batcher: Optional[QueryBatcher] = None

  @contextlib.asynccontextmanager
  async def lifespan(self, _app: fastapi.FastAPI) -> AsyncIterator[None]:
    """The batcher's worker runs while the server does."""
    self.batcher = QueryBatcher(self.engine.search, self.limits.max_batch,
                                self.limits.max_wait_ms / 1e3)
    try:
      yield
    finally:
      self.batcher.close()
      self.batcher = None

  # ---- checks

  def _text(self, text: str, name: str) -> str:
    text = text.strip()
    if not text:
      raise ApiError(422, f"{name}: the query is empty")
    if len(text) > self.limits.max_query_chars:
      raise ApiError(422, f"{name}: the query has {len(text)} characters, more than the limit "
                          f"of {self.limits.max_query_chars}")
    return text

  def _k(self, k: int) -> int:
    if not 1 <= k <= self.limits.max_k:
      raise ApiError(422, f"k: must be between 1 and {self.limits.max_k}, got {k}")
    return k

  def _duration(self, video_id: str) -> float:
    if video_id not in self.engine.durations:
      raise ApiError(404, f"video {video_id!r}: not in the index")
    return self.engine.durations[video_id]

  def _file(self, video_id: str) -> pathlib.Path:
    if self.library is None:
      raise ApiError(404, "this service has no videos (start it with --videos DIR)")
    self._duration(video_id)
    return self.library.path(video_id)  # NotServed: 404

  # ---- answers

  def _hit(self, h: Hit) -> dict[str, Any]:
    line = hit_line(h)
    if self.library is not None:
      servable = self.library.has(h.video_id)
      line["video_url"] = f"/videos/{_quote(h.video_id)}" if servable else None
      line["thumbnail_url"] = (f"/thumbnails/{_quote(h.video_id)}?t={h.start:.3f}" if servable
                               else None)
    return line

  async def _answer(self, texts: list[str], k: int) -> tuple[list[list[Hit]], dict[str, Any]]:
    results, info = await self.batcher.answer(texts)
    results = [hits[:k] for hits in results]
    self.moments.remember(results)
    return results, info.to_json()

  # ---- routes

  async def healthz(self) -> JSONResponse:
    e, library = self.engine, self.library
    return JSONResponse(dict(
        status="ok", videos=len(e.durations), model=e.model.name, index=str(e.index.directory),
        index_generation=e.index.generation, search=e.describe(),
        warm_up_s=e.warm_up_s, batch_sizes=list(e.sizes), limits=dataclasses.asdict(self.limits),
        batching=self.batcher.stats.to_json() if self.batcher else None,
        videos_served=None if library is None else library.num_servable(),
        thumbnails=None if library is None else library.cache_info()))

  async def search_one(self, q: str = Query(..., description="query text"),
                       k: int = Query(DEFAULT_K, description="results")) -> JSONResponse:
    text, k = self._text(q, "q"), self._k(k)
    (hits,), timing = await self._answer([text], k)
    return JSONResponse(dict(query=text, k=k, hits=[self._hit(h) for h in hits], timing=timing))

  async def search_batch(self, request: Request) -> JSONResponse:
    body = await _read_body(request, self.limits.max_body_bytes)
    try:
      batch = BatchRequest.model_validate_json(body or b"null")
    except pydantic.ValidationError as e:
      raise ApiError(422, _describe(list(e.errors()), "body") + ' (expected {"queries": '
                          '["text", ...], "k": 10})') from None
    if not 1 <= len(batch.queries) <= self.limits.max_batch:
      raise ApiError(422, f"queries: {len(batch.queries)} given, a request holds 1 to "
                          f"{self.limits.max_batch}")
    texts = [self._text(t, f"queries[{i}]") for i, t in enumerate(batch.queries)]
    k = self._k(batch.k)
    results, timing = await self._answer(texts, k)
    return JSONResponse(dict(k=k, timing=timing, results=[
        dict(query=t, hits=[self._hit(h) for h in hits]) for t, hits in zip(texts, results)]))

  async def video_info(self, video_id: str) -> JSONResponse:
    info = dict(video_id=video_id, duration=round(self._duration(video_id), 3),
                moments=self.moments.of(video_id))
    if self.library is not None:
      info["video_url"] = f"/videos/{_quote(video_id)}" if self.library.has(video_id) else None
    return JSONResponse(info)

  async def video_file(self, video_id: str) -> FileResponse:
    return FileResponse(self._file(video_id), headers={"cache-control": "no-cache"})

  def thumbnail(self, video_id: str, t: float = 0.0) -> Response:  # runs in a worker thread
    self._file(video_id)
    duration = self.engine.durations[video_id]
    if not (math.isfinite(t) and 0 <= t <= duration + 1e-3):
      raise ApiError(422, f"t: must be a time in the video, 0 to {duration:.3f} s, got {t}")
    try:
      jpeg = self.library.thumbnail(video_id, t)
    except NotServed:
      raise  # 404
    except SearchError as e:  # the file cannot be decoded: the service's problem, not the request's
      _LOG.warning("thumbnail: %s", e)
      raise ApiError(500, str(e)) from None
    return Response(jpeg, media_type="image/jpeg", headers={"cache-control": "max-age=3600"})

  async def index_page(self) -> Response:
    return Response(self.page, media_type="text/html; charset=utf-8",
                    headers={"cache-control": "no-cache"})

  async def asset(self, name: str) -> Response:
    if name not in ASSETS:
      raise ApiError(404, f"not found: /static/{name}")
    return Response(self.assets[name], media_type=ASSETS[name],
                    headers={"cache-control": "no-cache"})


def create_app(engine: SearchEngine, library: Optional[VideoLibrary] = None,
               limits: Limits = Limits()) -> fastapi.FastAPI:
  """The service's ASGI app.

  Args:
    engine: a loaded (and preferably warmed-up) SearchEngine.
    library: the servable videos (--videos), or None for a service without videos.
    limits: request limits; limits.max_batch must equal engine.max_batch and max_k engine.max_k.

  Returns:
    The FastAPI app; its lifespan starts and stops the query batcher.
  """
  api = SearchApi(engine, library, limits)
  app = fastapi.FastAPI(title="prvr_jax search", lifespan=api.lifespan, docs_url=None,
                        redoc_url=None, openapi_url=None)
  app.add_middleware(ResponsePolicy)
  app.add_exception_handler(PrvrError, _user_error)
  app.add_exception_handler(RequestValidationError, _validation_error)
  app.add_exception_handler(starlette.exceptions.HTTPException, _http_error)
  app.add_exception_handler(Exception, _internal_error)
  routes = [("/", api.index_page, ["GET"]), ("/static/{name}", api.asset, ["GET"]),
            ("/healthz", api.healthz, ["GET"]), ("/api/search", api.search_one, ["GET"]),
            ("/api/search", api.search_batch, ["POST"]),
            ("/api/videos/{video_id}", api.video_info, ["GET"]),
            ("/videos/{video_id}", api.video_file, ["GET", "HEAD"]),
            ("/thumbnails/{video_id}", api.thumbnail, ["GET"])]
  for path, endpoint, methods in routes:
    app.add_api_route(path, endpoint, methods=methods)
  return app
