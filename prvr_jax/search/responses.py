"""Response policy of the search service: security headers on everything, errors always JSON.

An ASGI middleware (wrapping the whole app) so that it also covers responses the routes do not
build themselves: Starlette answers a malformed or unsatisfiable Range header of a file response
in plain text; those become {"error": ...} with the same status and headers.
"""

from __future__ import annotations

import http
import json
from typing import Any, Callable

# The page loads nothing from elsewhere and cannot be framed.
SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'none'; script-src 'self'; style-src 'self'; "
                                 b"img-src 'self'; media-src 'self'; connect-src 'self'; "
                                 b"base-uri 'none'; form-action 'self'; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]


class ResponsePolicy:
  """ASGI middleware: security headers on every response, and every error body as JSON.

  Errors that Starlette answers in plain text (a malformed or unsatisfiable Range header of a
  file response) become {"error": ...} with the same status and headers.
  """

  def __init__(self, app: Any):
    self.app = app

  async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
    if scope["type"] != "http":
      await self.app(scope, receive, send)
      return
    held: dict[str, Any] = {}

    async def policed(message: dict) -> None:
      if message["type"] == "http.response.start":
        headers = [(k, v) for k, v in message.get("headers", []) if k.lower() not in
                   {h for h, _ in SECURITY_HEADERS}] + SECURITY_HEADERS
        message = dict(message, headers=headers)
        content_type = dict((k.lower(), v) for k, v in headers).get(b"content-type", b"")
        if message["status"] >= 400 and not content_type.startswith(b"application/json"):
          held["start"], held["body"] = message, b""
          return
      elif message["type"] == "http.response.body" and "start" in held:
        held["body"] += message.get("body", b"")
        if message.get("more_body"):
          return
        await send_json_error(held["start"], held["body"])
        return
      await send(message)

    async def send_json_error(start: dict, body: bytes) -> None:
      status = start["status"]
      text = body.decode("utf-8", "replace").strip().rstrip(".")
      headers = dict((k.lower(), v) for k, v in start["headers"])
      detail = text or http.HTTPStatus(status).phrase
      if status == 416:
        detail = (f"range not satisfiable: the request's Range header is outside the file "
                  f"({headers.get(b'content-range', b'').decode()})")
      elif status == 400 and text.lower().startswith("malformed range"):
        detail = "malformed Range header"
      payload = json.dumps({"error": detail}).encode()
      kept = [(k, v) for k, v in start["headers"] if k.lower() not in (b"content-type",
                                                                        b"content-length")]
      await send(dict(start, headers=kept + [(b"content-type", b"application/json"),
                                             (b"content-length", str(len(payload)).encode())]))
      await send({"type": "http.response.body", "body": payload})

    await self.app(scope, receive, policed)
