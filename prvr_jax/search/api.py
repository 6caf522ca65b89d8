"""The search service's HTTP API and page: a FastAPI app over a loaded SearchEngine.

Routes (JSON unless said otherwise):
  GET  /                      the search page (prvr_jax/search/web/, no build step, no CDN)
  GET  /static/{name}         its script, style sheet and icon (a fixed list; nothing else)
  GET  /healthz               {status, videos, model, index, limits, batching, thumbnails, ...}
  GET  /api/search?q=..&k=..  {query, k, hits: [hit...], timing}
  POST /api/search            body {"queries": [...], "k": K} -> {k, results: [{query, hits}], timing}
  GET  /api/videos/{id}       {video_id, duration, video_url, moments: the moments of the last
                              search that returned this video, each with its query}
  GET  /videos/{id}           the video file (HTTP range requests), with --videos only
  GET  /thumbnails/{id}?t=S   JPEG of the frame shown at S seconds, with --videos only

A hit has the fields of the CLI's JSON lines (query, rank, video_id, score, clip_score,
frame_score, start, end, branch) plus, when the service has --videos, `video_url` and
`thumbnail_url` (paths on this server; null for a video without a servable file).

Bad requests (unknown route or id, a missing / empty / too long query, k out of range, too many
queries, a body that is not the JSON asked for or too large, an unsatisfiable range, ...) get a
4xx with {"error": "<what was wrong>"}; a failure inside the service gets a 500 with an error
line and the traceback goes to the server's log only. Every response carries a strict
Content-Security-Policy (the page loads nothing from elsewhere).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import pathlib
import sys
import traceback
import urllib.parse
from typing import Any, Optional

import fastapi
import pydantic
import starlette.exceptions
from fastapi import Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response

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


class ApiError(Exception):
  """A request the service refuses: answered with `status` and {"error": message}."""

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
  if limits.max_batch != engine.max_batch or limits.max_k != engine.max_k:
    raise ValueError(f"limits ({limits.max_batch}, {limits.max_k}) differ from the engine's "
                     f"({engine.max_batch}, {engine.max_k})")
  page = (WEB_DIR / "index.html").read_bytes()
  assets = {name: (WEB_DIR / name).read_bytes() for name in ASSETS}
  moments = LastMoments()
  state: dict[str, QueryBatcher] = {}

  @contextlib.asynccontextmanager
  async def lifespan(_app):
    state["batcher"] = QueryBatcher(engine.search, limits.max_batch, limits.max_wait_ms / 1e3)
    try:
      yield
    finally:
      state.pop("batcher").close()

  app = fastapi.FastAPI(title="prvr_jax search", lifespan=lifespan, docs_url=None,
                        redoc_url=None, openapi_url=None)
  app.add_middleware(ResponsePolicy)

  @app.exception_handler(ApiError)
  async def api_error(_request: Request, e: ApiError) -> JSONResponse:
    return JSONResponse({"error": e.message}, status_code=e.status)

  @app.exception_handler(RequestValidationError)
  async def validation_error(_request: Request, e: RequestValidationError) -> JSONResponse:
    return JSONResponse({"error": _describe(list(e.errors()))}, status_code=422)

  @app.exception_handler(starlette.exceptions.HTTPException)
  async def http_error(request: Request, e: starlette.exceptions.HTTPException) -> JSONResponse:
    message = {404: f"not found: {request.url.path}",
               405: f"method {request.method} not allowed on {request.url.path}"}
    return JSONResponse({"error": message.get(e.status_code, str(e.detail))},
                        status_code=e.status_code, headers=getattr(e, "headers", None))

  @app.exception_handler(Exception)
  async def internal_error(request: Request, e: Exception) -> JSONResponse:
    traceback.print_exception(e, file=sys.stderr)  # the log gets the traceback, the client not
    return JSONResponse({"error": f"internal error while answering {request.url.path}: "
                                  f"{type(e).__name__}"}, status_code=500)

  def hit_json(h: Hit) -> dict[str, Any]:
    line = hit_line(h)
    if library is not None:
      servable = library.has(h.video_id)
      line["video_url"] = f"/videos/{_quote(h.video_id)}" if servable else None
      line["thumbnail_url"] = (f"/thumbnails/{_quote(h.video_id)}?t={h.start:.3f}" if servable
                               else None)
    return line

  def checked_text(text: str, name: str) -> str:
    text = text.strip()
    if not text:
      raise ApiError(422, f"{name}: the query is empty")
    if len(text) > limits.max_query_chars:
      raise ApiError(422, f"{name}: the query has {len(text)} characters, more than the limit "
                          f"of {limits.max_query_chars}")
    return text

  def checked_k(k: int) -> int:
    if not 1 <= k <= limits.max_k:
      raise ApiError(422, f"k: must be between 1 and {limits.max_k}, got {k}")
    return k

  async def answer(texts: list[str], k: int) -> tuple[list[list[Hit]], dict[str, Any]]:
    results, info = await state["batcher"].answer(texts)
    results = [hits[:k] for hits in results]
    moments.remember(results)
    return results, info.to_json()

  @app.get("/healthz")
  async def healthz() -> JSONResponse:
    batcher = state.get("batcher")
    return JSONResponse(dict(
        status="ok", videos=len(engine.durations), model=engine.model.name,
        index=str(engine.index.directory), warm_up_s=engine.warm_up_s,
        batch_sizes=list(engine.sizes), limits=dataclasses.asdict(limits),
        batching=batcher.stats.to_json() if batcher else None,
        videos_served=None if library is None else library.num_servable(),
        thumbnails=None if library is None else library.cache_info()))

  @app.get("/api/search")
  async def search_one(q: str = Query(..., description="query text"),
                       k: int = Query(DEFAULT_K, description="results")) -> JSONResponse:
    text, k = checked_text(q, "q"), checked_k(k)
    (hits,), timing = await answer([text], k)
    return JSONResponse(dict(query=text, k=k, hits=[hit_json(h) for h in hits], timing=timing))

  @app.post("/api/search")
  async def search_batch(request: Request) -> JSONResponse:
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limits.max_body_bytes):
      raise ApiError(413, f"body: {declared} bytes declared, the limit is "
                          f"{limits.max_body_bytes}")
    body = b""
    async for part in request.stream():
      body += part
      if len(body) > limits.max_body_bytes:
        raise ApiError(413, f"body: more than the limit of {limits.max_body_bytes} bytes")
    try:
      batch = BatchRequest.model_validate_json(body or b"null")
    except pydantic.ValidationError as e:
      raise ApiError(422, _describe(list(e.errors()), "body") + ' (expected {"queries": '
                          '["text", ...], "k": 10})') from None
    if not 1 <= len(batch.queries) <= limits.max_batch:
      raise ApiError(422, f"queries: {len(batch.queries)} given, a request holds 1 to "
                          f"{limits.max_batch}")
    texts = [checked_text(t, f"queries[{i}]") for i, t in enumerate(batch.queries)]
    k = checked_k(batch.k)
    results, timing = await answer(texts, k)
    return JSONResponse(dict(k=k, timing=timing, results=[
        dict(query=t, hits=[hit_json(h) for h in hits]) for t, hits in zip(texts, results)]))

  def known(video_id: str) -> float:
    if video_id not in engine.durations:
      raise ApiError(404, f"video {video_id!r}: not in the index")
    return engine.durations[video_id]

  @app.get("/api/videos/{video_id}")
  async def video_info(video_id: str) -> JSONResponse:
    duration = known(video_id)
    info = dict(video_id=video_id, duration=round(duration, 3), moments=moments.of(video_id))
    if library is not None:
      info["video_url"] = f"/videos/{_quote(video_id)}" if library.has(video_id) else None
    return JSONResponse(info)

  def servable(video_id: str) -> pathlib.Path:
    if library is None:
      raise ApiError(404, "this service has no videos (start it with --videos DIR)")
    known(video_id)
    try:
      return library.path(video_id)
    except NotServed as e:
      raise ApiError(404, str(e)) from None

  @app.api_route("/videos/{video_id}", methods=["GET", "HEAD"])
  async def video_file(video_id: str) -> FileResponse:
    return FileResponse(servable(video_id), headers={"cache-control": "no-cache"})

  @app.get("/thumbnails/{video_id}")
  def thumbnail(video_id: str, t: float = 0.0) -> Response:  # decoding runs in a worker thread
    servable(video_id)
    duration = engine.durations[video_id]
    if not (math.isfinite(t) and 0 <= t <= duration + 1e-3):
      raise ApiError(422, f"t: must be a time in the video, 0 to {duration:.3f} s, got {t}")
    try:
      jpeg = library.thumbnail(video_id, t)
    except NotServed as e:
      raise ApiError(404, str(e)) from None
    except SearchError as e:
      raise ApiError(500, str(e)) from None
    return Response(jpeg, media_type="image/jpeg", headers={"cache-control": "max-age=3600"})

  @app.get("/")
  async def index_page() -> Response:
    return Response(page, media_type="text/html; charset=utf-8",
                    headers={"cache-control": "no-cache"})

  @app.get("/static/{name}")
  async def asset(name: str) -> Response:
    if name not in ASSETS:
      raise ApiError(404, f"not found: /static/{name}")
    return Response(assets[name], media_type=ASSETS[name], headers={"cache-control": "no-cache"})

  return app
