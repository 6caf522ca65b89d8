"""`python -m prvr_jax.search serve`: load the engine, warm it up, serve the app with uvicorn.

Binds 127.0.0.1 unless told otherwise (a warning names the risk of any other address), binds the
port before the slow model restore (a port in use fails at once), prints `ready: URL ...` only
once the warmed-up server accepts connections, and stops gracefully on Ctrl-C / SIGTERM
(in-flight requests are answered, then `stopped`, exit status 0). See api.py for the routes.
"""

from __future__ import annotations

import contextlib
import ipaddress
import pathlib
import signal
import socket
import sys
import threading
from typing import Callable, Iterator, Optional

import fastapi
import uvicorn

from prvr_jax.search.api import Limits, create_app
from prvr_jax.search.errors import SearchError
from prvr_jax.search.media import VideoLibrary
from prvr_jax.search.service import SearchSettings, open_engine


class _Server(uvicorn.Server):
  """uvicorn's server, calling `on_ready` once it accepts connections."""

  def __init__(self, config: uvicorn.Config, on_ready: Callable[[], None]):
    super().__init__(config)
    self._on_ready = on_ready

  async def startup(self, sockets: Optional[list[socket.socket]] = None) -> None:
    await super().startup(sockets=sockets)
    if self.started:
      self._on_ready()

  @contextlib.contextmanager
  def capture_signals(self) -> Iterator[None]:
    # uvicorn's own version raises the captured SIGINT / SIGTERM again after its graceful
    # shutdown, which ends the process with a KeyboardInterrupt traceback (or a kill); by then
    # the service has stopped cleanly, and `serve` says so and exits 0.
    if threading.current_thread() is not threading.main_thread():
      yield
      return
    original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT,
                                                                      signal.SIGTERM)}
    try:
      yield
    finally:
      for sig, handler in original.items():
        signal.signal(sig, handler)


def listen_socket(host: str, port: int) -> socket.socket:
  """A TCP socket bound to host:port (port 0: a free one), for uvicorn to listen on.

  Raises:
    SearchError: the address cannot be used (in use, not this machine's, ...).
  """
  try:
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
  except OSError as e:
    raise SearchError(f"--host {host}: cannot use this address ({e})") from None
  try:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(address)
  except OSError as e:
    sock.close()
    raise SearchError(f"--host {host} --port {port}: cannot listen there ({e.strerror})") from None
  return sock


def make_server(app: fastapi.FastAPI, limits: Limits, on_ready: Callable[[], None] = lambda: None,
                access_log: bool = False) -> uvicorn.Server:
  """A uvicorn server for `app` (run it with `.run(sockets=[listen_socket(...)])`)."""
  # The pure-Python event loop and HTTP parser (uvloop / httptools are optional extras of
  # uvicorn, not requirements here): the same behaviour wherever it runs.
  config = uvicorn.Config(app, loop="asyncio", http="h11", log_level="warning",
                          access_log=access_log, lifespan="on",
                          limit_concurrency=limits.max_connections, timeout_graceful_shutdown=10,
                          server_header=False)
  return _Server(config, on_ready)


def is_loopback(host: str) -> bool:
  """Whether every address `host` names is a loopback address (only this machine can connect)."""
  try:
    infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
  except OSError:
    return False
  return all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def serve(index: str, *, clip: Optional[str] = None, text_kind: str = "projected",
          precision: str = "highest", workdir: Optional[str] = None, videos: Optional[str] = None,
          host: str = "127.0.0.1", port: int = 8080, limits: Limits = Limits(),
          settings: SearchSettings = SearchSettings(), access_log: bool = False) -> None:
  """`python -m prvr_jax.search serve`: load, warm up, serve until SIGINT / SIGTERM.

  Prints `ready: http://HOST:PORT/ ...` on stdout once the server accepts connections (after the
  model, the index and the warm-up), and `stopped` when it has shut down.

  Raises:
    SearchError (and the checkpoint errors of `open_engine`): bad input, reported before serving.
  """
  if videos is not None and not pathlib.Path(videos).is_dir():
    raise SearchError(f"{videos}: --videos directory not found")
  if not is_loopback(host):
    print(f"warning: --host {host} is not a loopback address: anyone who can reach this machine "
          "can search the index and watch the videos", file=sys.stderr)
  sock = listen_socket(host, port)  # a port in use fails now, not after the slow restore
  try:
    engine = open_engine(index, clip=clip, text_kind=text_kind, precision=precision,
                         workdir=workdir, max_k=limits.max_k, max_batch=limits.max_batch,
                         settings=settings)
    library = VideoLibrary(videos, engine.durations) if videos is not None else None
    print(f"warming up (batch sizes {', '.join(map(str, engine.sizes))}) ...", file=sys.stderr,
          flush=True)
    engine.warm_up()
    app = create_app(engine, library, limits)
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    files = "" if library is None else f", {library.num_servable()} with video files"

    def ready() -> None:
      mode = ", ".join(f"{k} {v}" for k, v in engine.describe().items())
      print(f"ready: http://{shown}:{bound_port}/ ({len(engine.durations)} videos{files}; model "
            f"{engine.model.name}; {mode}; warm-up {engine.warm_up_s:.1f} s)", flush=True)

    make_server(app, limits, ready, access_log).run(sockets=[sock])
  finally:
    sock.close()
  print("stopped", flush=True)
