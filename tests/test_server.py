"""The search service: the real `serve` command on a loopback port, a real headless Chromium.

One tiny world (tests/server_world.py: WebM videos written with PyAV, the tiny CLIP, a tiny run
trained for one step, its index) is built for the module and served once by the real command;
the tests query it over HTTP, attack it, load it, drive its page in Chromium, and finally shut it
down. The last test (`test_shutdown`) stops the module's server, so it must stay last.
"""

from __future__ import annotations

import http.client
import io
import json
import logging
import math
import os
import socket
import threading
import urllib.parse

import jax
import numpy as np
import pytest
from PIL import Image
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from prvr_jax.models.msc import init_params
from prvr_jax.search import ann as ann_lib
from prvr_jax.search import cli
from prvr_jax.search.api import Limits, create_app
from prvr_jax.search.index import build_index
from prvr_jax.search.load import run_load
from prvr_jax.search.errors import SearchError
from prvr_jax.search.model import from_params, load_search_model
from prvr_jax.search.server import listen_socket, make_server
from prvr_jax.search.service import SearchSettings, open_engine
from tests.server_world import (CHROMEDRIVER, CHROMIUM, RATE, SCENES, build_world,
                                headless_chromium, scene_frame, serve_args, ServeProcess)

pytestmark = pytest.mark.slow  # the module trains a tiny run and starts servers (~2-3 min)

CLI_FIELDS = {"query", "rank", "video_id", "score", "clip_score", "frame_score", "start", "end",
              "branch"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  return build_world(tmp_path_factory.mktemp("world"))


@pytest.fixture(scope="module")
def served(world):
  server = ServeProcess(serve_args(world))
  yield server
  server.stop()


def request(url: str, method: str, path: str, body: bytes | None = None,
            headers: dict | None = None) -> tuple[int, dict, bytes]:
  """(status, headers, body); `path` is sent exactly as given (no normalisation)."""
  parts = urllib.parse.urlsplit(url)
  conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
  try:
    conn.request(method, path, body=body, headers=headers or {})
    response = conn.getresponse()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
  finally:
    conn.close()


def get_json(url: str, path: str) -> dict:
  status, _, body = request(url, "GET", path)
  assert status == 200, body
  return json.loads(body)


def search(url: str, text: str, k: int) -> dict:
  return get_json(url, f"/api/search?q={urllib.parse.quote(text)}&k={k}")


def test_search_answers_what_the_cli_answers(world, served, capsys):
  text, k = "a red car races past at night", 4
  got = search(served.url, text, k)
  assert got["query"] == text and got["k"] == k and len(got["hits"]) == k
  assert got["timing"]["batch_queries"] >= 1 and got["timing"]["compute_ms"] > 0
  for hit in got["hits"]:
    assert set(hit) == CLI_FIELDS | {"video_url", "thumbnail_url"}
  # The one-shot CLI restores the same checkpoint: the same hits, to the printed digits.
  assert cli.main(["query", "--index", str(world.index), "--clip", str(world.clip), text,
                   "--top-k", str(k)]) == 0
  lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  served_hits = [{key: h[key] for key in CLI_FIELDS} for h in got["hits"]]
  assert [h["video_id"] for h in served_hits] == [h["video_id"] for h in lines]
  for mine, theirs in zip(served_hits, lines):
    for key in ("score", "clip_score", "frame_score"):
      assert abs(mine[key] - theirs[key]) <= 2e-6, (key, mine, theirs)
    assert (mine["start"], mine["end"], mine["branch"]) == (theirs["start"], theirs["end"],
                                                            theirs["branch"])
  # A batch answers each query as a lone request does (padding and batch size change nothing).
  texts = [text, "snow on a mountain", "forest"]
  status, _, body = request(served.url, "POST", "/api/search",
                            json.dumps({"queries": texts, "k": k}).encode(),
                            {"content-type": "application/json"})
  assert status == 200, body
  batch = json.loads(body)
  assert [r["query"] for r in batch["results"]] == texts and batch["timing"]["batch_queries"] >= 3
  for t, result in zip(texts, batch["results"]):
    alone = search(served.url, t, k)["hits"]
    assert [h["video_id"] for h in result["hits"]] == [h["video_id"] for h in alone]
    np.testing.assert_allclose([h["score"] for h in result["hits"]],
                               [h["score"] for h in alone], atol=2e-6)
  # URLs: the servable files only (`escape` is a link out of --videos: indexed, never served).
  everything = search(served.url, text, 20)["hits"]
  assert {h["video_id"] for h in everything} == set(world.durations)
  for h in everything:
    if h["video_id"] == "escape":
      assert h["video_url"] is None and h["thumbnail_url"] is None
    else:
      assert h["video_url"] == f"/videos/{h['video_id']}"
      assert h["thumbnail_url"] == f"/thumbnails/{h['video_id']}?t={h['start']:.3f}"


def test_healthz_reports_the_loaded_service(world, served):
  health = get_json(served.url, "/healthz")
  assert health["status"] == "ok" and health["videos"] == len(world.durations)
  assert health["videos_served"] == len(world.durations) - 1  # all but the link out
  assert health["model"] == f"{world.run} step 1" and health["warm_up_s"] > 0
  assert health["batch_sizes"] == [1, 4]
  assert health["search"] == {"mode": "exact"}  # auto: below query.EXACT_BELOW videos
  assert health["limits"]["max_k"] == 20 and health["limits"]["max_batch"] == 4
  assert "; mode exact; warm-up" in served.ready_line


def test_video_files_answer_range_requests(world, served):
  data = (world.videos / "forest_trail.webm").read_bytes()
  status, headers, body = request(served.url, "GET", "/videos/forest_trail",
                                  headers={"Range": "bytes=10-99"})
  assert status == 206 and body == data[10:100]
  assert headers["content-range"] == f"bytes 10-99/{len(data)}"
  assert headers["content-type"] == "video/webm" and headers["accept-ranges"] == "bytes"
  status, headers, body = request(served.url, "GET", "/videos/forest_trail",
                                  headers={"Range": f"bytes={len(data) - 7}-"})
  assert status == 206 and body == data[-7:]
  status, _, body = request(served.url, "GET", "/videos/forest_trail")
  assert status == 200 and body == data


def _mean_colour(jpeg: bytes) -> np.ndarray:
  image = Image.open(io.BytesIO(jpeg))
  assert image.format == "JPEG" and image.size == (320, 180)
  return np.asarray(image.convert("RGB"), np.float32).mean(axis=(0, 1))


def test_thumbnail_is_the_frame_shown_at_the_moment(served):
  colours = SCENES["city_night"]  # dark blue, yellow, blue, red: one per second
  means = {}
  for t in (0.55, 1.25, 3.35):
    status, headers, body = request(served.url, "GET", f"/thumbnails/city_night?t={t}")
    assert status == 200 and headers["content-type"] == "image/jpeg"
    means[t] = _mean_colour(body)
    want = scene_frame(colours, math.floor(t * RATE + 1e-9)).astype(np.float32).mean(axis=(0, 1))
    assert np.abs(means[t] - want).max() < 12, (t, means[t], want)
  assert np.abs(means[0.55] - means[1.25]).max() > 60  # another second, another scene
  before = get_json(served.url, "/healthz")["thumbnails"]
  assert request(served.url, "GET", "/thumbnails/city_night?t=1.25")[0] == 200
  after = get_json(served.url, "/healthz")["thumbnails"]
  assert after["hits"] == before["hits"] + 1 and after["misses"] == before["misses"]


def test_video_info_gives_duration_and_moments_of_the_last_search(world, served):
  texts = ["snow on a mountain", "a forest trail"]
  status, _, body = request(served.url, "POST", "/api/search",
                            json.dumps({"queries": texts, "k": 6}).encode())
  assert status == 200
  results = json.loads(body)["results"]
  info = get_json(served.url, "/api/videos/snow_mountain")
  assert info["video_id"] == "snow_mountain" and info["video_url"] == "/videos/snow_mountain"
  assert info["duration"] == pytest.approx(world.durations["snow_mountain"], abs=1e-3)
  want = [dict(query=r["query"], rank=h["rank"], start=h["start"], end=h["end"])
          for r in results for h in r["hits"] if h["video_id"] == "snow_mountain"]
  assert len(want) == 2  # 6 videos, k = 6: every query returns every video
  assert [{key: m[key] for key in ("query", "rank", "start", "end")}
          for m in info["moments"]] == want
  search(served.url, "a red car", 6)
  assert [m["query"] for m in get_json(served.url, "/api/videos/snow_mountain")["moments"]] == [
      "a red car"]


# (method, path, headers, body, status): each must be refused with this 4xx and a JSON error.
LONG = "x" * 201  # serve_args sets --max-query-chars 200, --max-k 20, --max-batch 4
ATTACKS = [
    ("GET", "/videos/../../etc/passwd", {}, None, 404),
    ("GET", "/videos/..%2F..%2F..%2Fetc%2Fpasswd", {}, None, 404),
    ("GET", "/videos/%2Fetc%2Fpasswd", {}, None, 404),
    ("GET", "/videos//etc/passwd", {}, None, 404),
    ("GET", "/videos/escape", {}, None, 404),  # indexed, but a link out of --videos
    ("GET", "/videos/escape.webm", {}, None, 404),
    ("GET", "/videos/stranger", {}, None, 404),  # a file under --videos, not in the index
    ("GET", "/videos/..%2Foutside%2Fsecret", {}, None, 404),
    ("GET", "/thumbnails/escape?t=1", {}, None, 404),
    ("GET", "/thumbnails/stranger?t=0", {}, None, 404),
    ("GET", "/thumbnails/..%2F..%2Fetc%2Fpasswd?t=0", {}, None, 404),
    ("GET", "/static/..%2Fapi.py", {}, None, 404),
    ("GET", "/static/../api.py", {}, None, 404),
    ("GET", "/static/index.html", {}, None, 404),
    ("GET", "/static/%2Fetc%2Fpasswd", {}, None, 404),
    ("GET", "/api/videos/..%2F..%2Fetc%2Fpasswd", {}, None, 404),
    ("GET", "/api/videos/stranger", {}, None, 404),
    ("GET", "/nope", {}, None, 404),
    ("GET", "/api/search", {}, None, 422),
    ("GET", "/api/search?q=", {}, None, 422),
    ("GET", "/api/search?q=%20%20%20", {}, None, 422),
    ("GET", f"/api/search?q={LONG}", {}, None, 422),
    ("GET", "/api/search?q=dog&k=0", {}, None, 422),
    ("GET", "/api/search?q=dog&k=21", {}, None, 422),
    ("GET", "/api/search?q=dog&k=abc", {}, None, 422),
    ("GET", "/api/search?q=dog&k=99999999999999999999", {}, None, 422),
    ("POST", "/api/search", {}, b"not json", 422),
    ("POST", "/api/search", {}, b"", 422),
    ("POST", "/api/search", {}, b'{"queries": "a dog"}', 422),
    ("POST", "/api/search", {}, b'{"queries": []}', 422),
    ("POST", "/api/search", {}, json.dumps({"queries": ["a"] * 5}).encode(), 422),
    ("POST", "/api/search", {}, b'{"queries": [1, 2]}', 422),
    ("POST", "/api/search", {}, b'{"queries": ["a dog"], "k": 0}', 422),
    ("POST", "/api/search", {}, b'{"queries": ["a dog"], "extra": 1}', 422),
    ("POST", "/api/search", {}, json.dumps({"queries": ["", "a"]}).encode(), 422),
    ("POST", "/api/search", {}, json.dumps({"queries": [LONG]}).encode(), 422),
    ("POST", "/api/search", {}, b"[" + b"1," * 200_000 + b"1]", 413),
    ("POST", "/api/search", {"Content-Length": "99999999"}, b"{}", 413),
    ("DELETE", "/api/search", {}, None, 405),
    ("PUT", "/videos/forest_trail", {}, b"overwrite", 405),
    ("GET", "/thumbnails/forest_trail?t=-1", {}, None, 422),
    ("GET", "/thumbnails/forest_trail?t=nan", {}, None, 422),
    ("GET", "/thumbnails/forest_trail?t=inf", {}, None, 422),
    ("GET", "/thumbnails/forest_trail?t=1e9", {}, None, 422),
    ("GET", "/thumbnails/forest_trail?t=abc", {}, None, 422),
    ("GET", "/videos/forest_trail", {"Range": "bytes=999999999-"}, None, 416),
    ("GET", "/videos/forest_trail", {"Range": "bytes=abc"}, None, 400),
]


def _assert_still_serving(url: str) -> None:
  assert get_json(url, "/healthz")["status"] == "ok"
  assert len(search(url, "a dog", 3)["hits"]) == 3


def test_attacks_are_refused_with_a_json_error_and_the_service_keeps_serving(world, served):
  secret = (world.outside / "secret.webm").read_bytes()
  for method, path, headers, body, want in ATTACKS:
    if body is not None and "Content-Length" not in headers:
      headers = dict(headers, **{"Content-Type": "application/json"})
    status, got_headers, answer = request(served.url, method, path, body, headers)
    what = f"{method} {path[:60]} {headers}"
    assert status == want, (what, status, answer[:300])
    assert got_headers["content-type"] == "application/json", what
    error = json.loads(answer)["error"]
    assert isinstance(error, str) and error and "Traceback" not in error, (what, error)
    assert secret[:64] not in answer and b"root:" not in answer, what
  # Not even HTTP: uvicorn refuses it (4xx) and closes that connection only.
  parts = urllib.parse.urlsplit(served.url)
  with socket.create_connection((parts.hostname, parts.port), timeout=30) as raw:
    raw.sendall(b"\x16\x03\x01\x02\x00 NOT HTTP AT ALL\r\n\r\n")
    reply = raw.recv(4096)
  assert reply.startswith(b"HTTP/1.1 4"), reply[:100]
  _assert_still_serving(served.url)
  assert served.proc.poll() is None
  assert "Traceback" not in "".join(served.stderr)


def test_load_16_clients_x_50_queries(served):
  report = run_load(served.url, clients=16, per_client=50, k=5, timeout=120)
  assert report["requests"] == 800 and report["errors"] == 0, report
  # 16 requests in flight, up to 4 queries per encoder call: calls are shared.
  assert report["batching"]["mean_batch_queries"] > 1.5, report
  assert report["batching"]["batches"] < 800 / 1.5
  _assert_still_serving(served.url)


def _chromium_or_skip() -> None:
  if os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER):
    return
  message = f"{CHROMIUM} / {CHROMEDRIVER} not found: apt-get install -y chromium chromium-driver"
  if os.environ.get("CI"):
    pytest.fail(message)  # .ci/run installs them: their absence there is a failure
  pytest.skip(message)


def _moment(start: float, end: float) -> str:
  clock = lambda s: f"{s // 60:02d}:{s % 60:02d}"
  return f"{clock(math.floor(start + 1e-6))}-{clock(math.ceil(end - 1e-6))}"


def test_page_in_headless_chromium_plays_the_top_moment(served, tmp_path):
  _chromium_or_skip()
  text = "a red car races past at night"
  want = search(served.url, text, 10)["hits"]
  driver = headless_chromium(tmp_path / "profile")
  try:
    driver.get(served.url + "/")
    box = driver.find_element(By.ID, "q")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)
    wait = WebDriverWait(driver, 60)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results li.hit")) == len(want))
    items = driver.find_elements(By.CSS_SELECTOR, "#results li.hit")
    assert [i.get_attribute("data-video-id") for i in items] == [h["video_id"] for h in want]
    for item, hit in zip(items, want):
      assert item.find_element(By.CSS_SELECTOR, ".moment").text == _moment(hit["start"],
                                                                           hit["end"])
      assert item.find_element(By.CSS_SELECTOR, ".video-id").text == hit["video_id"]
      shown = item.find_element(By.CSS_SELECTOR, ".score").text  # "score 0.123"
      assert float(shown.split()[-1]) == pytest.approx(hit["score"], abs=5e-4 + 1e-9)
    player_state = ("const v = document.getElementById('player');"
                    "return [v.dataset.state, v.currentTime, v.src, v.readyState];")
    wait.until(lambda d: d.execute_script(player_state)[0] == "ready")
    state, current, src, ready = driver.execute_script(player_state)
    top = want[0]
    assert top["video_url"] and src == served.url + top["video_url"]
    assert current == pytest.approx(top["start"], abs=1e-3) and ready >= 1
    # Another moment with a later start: the player seeks there (the file is fetched by range).
    later = next(i for i, h in enumerate(want)
                 if h["video_url"] and h["start"] > 0 and h["video_id"] != top["video_id"])
    items[later].click()
    wait.until(lambda d: d.execute_script(player_state)[0] == "ready"
               and d.execute_script(player_state)[2] == served.url + want[later]["video_url"])
    state, current, src, ready = driver.execute_script(player_state)
    assert current == pytest.approx(want[later]["start"], abs=1e-3)
    thumbs = driver.find_elements(By.CSS_SELECTOR, "#results li.hit img.thumb")
    assert len(thumbs) == sum(1 for h in want if h["thumbnail_url"])
    wait.until(lambda d: d.execute_script(
        "return [...document.querySelectorAll('img.thumb')].every(i => i.naturalWidth === 320)"))
    # A refused request (k above --max-k, from a link) shows the service's error.
    driver.get(served.url + "/?q=a%20dog&k=999")
    wait.until(lambda d: "k: must be between 1 and 20" in d.find_element(By.ID, "message").text)
    assert "error" in driver.find_element(By.ID, "message").get_attribute("class")
    png = tmp_path / "page.png"
    assert driver.save_screenshot(str(png)) and Image.open(png).format == "PNG"
  finally:
    driver.quit()


def _raise(exc: Exception):
  def fail(*args, **kwargs):
    raise exc
  return fail


class _Records(logging.Handler):
  """Keeps the records a logger emits (uvicorn's loggers do not propagate to caplog's)."""

  def __init__(self):
    super().__init__()
    self.lines: list[str] = []

  def emit(self, record: logging.LogRecord) -> None:
    self.lines.append(logging.Formatter().format(record))


def test_ann_service_without_videos_answers_hits_without_urls(world, served, monkeypatch):
  # ANN mode (the index holds a flat FAISS index of each branch: below query.EXACT_BELOW videos
  # `auto` would search exactly): its candidates are re-scored exactly, so with every video a
  # candidate it answers what the exact service answers.
  engine = open_engine(str(world.index), clip=str(world.clip), max_k=5, max_batch=2,
                       settings=SearchSettings(mode="ann", candidates=6))
  engine.warm_up()
  limits = Limits(max_k=5, max_batch=2)
  sock = listen_socket("127.0.0.1", 0)
  url = f"http://127.0.0.1:{sock.getsockname()[1]}"
  ready = threading.Event()
  server = make_server(create_app(engine, None, limits), limits, ready.set)
  thread = threading.Thread(target=server.run, kwargs=dict(sockets=[sock]), daemon=True)
  thread.start()
  log = _Records()
  logging.getLogger("uvicorn.error").addHandler(log)
  try:
    assert ready.wait(60)
    hits = search(url, "a dog", 5)["hits"]
    assert len(hits) == 5 and all(set(h) == CLI_FIELDS for h in hits)
    exact = search(served.url, "a dog", 5)["hits"]
    assert [{key: h[key] for key in CLI_FIELDS} for h in exact] == hits
    status, _, body = request(url, "GET", "/videos/forest_trail")
    assert status == 404 and "start it with --videos" in json.loads(body)["error"]
    health = get_json(url, "/healthz")
    assert health["videos_served"] is None
    assert health["search"] == dict(mode="ann", nprobe=ann_lib.DEFAULT_NPROBE, candidates=6)
    # A user error raised while answering is a 4xx naming it; a bug is a 500 whose traceback goes
    # to the server's log, never to the client; either way the service keeps serving.
    monkeypatch.setattr(engine, "_encoder", _raise(SearchError("query 'a dog': cannot encode")))
    status, _, body = request(url, "GET", "/api/search?q=a%20dog&k=3")
    assert (status, json.loads(body)) == (422, {"error": "query 'a dog': cannot encode"})
    monkeypatch.setattr(engine, "_encoder", _raise(RuntimeError("lost an axis")))
    status, _, body = request(url, "POST", "/api/search",
                              b'{"queries": ["a dog", "a cat"], "k": 3}')
    assert (status, json.loads(body)) == (
        500, {"error": "internal error while answering /api/search: RuntimeError"})
    monkeypatch.undo()
    assert len(search(url, "a dog", 5)["hits"]) == 5
  finally:
    server.should_exit = True
    thread.join(30)
    logging.getLogger("uvicorn.error").removeHandler(log)
  assert not thread.is_alive()
  # One request, one bug, one logged traceback (the POST's two queries share one encoder call).
  logged = "\n".join(log.lines)
  assert logged.count("Exception in ASGI application") == 1, logged
  assert "Traceback" in logged and "RuntimeError: lost an axis" in logged
  assert "cannot encode" not in logged  # a user error is answered, not logged
  with pytest.raises(OSError):
    socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=5).close()


def test_an_index_of_another_model_refuses_to_start(world, tmp_path, capsys):
  run = load_search_model(world.run)
  other = from_params(run.model_cfg, init_params(run.model_cfg, jax.random.key(7)),
                      workdir=run.identity["workdir"], which="best", step=run.identity["step"])
  build_index(other, world.features, tmp_path / "other", progress=False)
  status = []
  args = ["serve", "--index", str(tmp_path / "other"), "--clip", str(world.clip), "--port", "0"]
  # In a thread, so that a server that wrongly started fails this test instead of hanging it.
  attempt = threading.Thread(target=lambda: status.append(cli.main(args)), daemon=True)
  attempt.start()
  attempt.join(180)
  assert not attempt.is_alive(), "serve started with an index of another model"
  out, err = capsys.readouterr()
  assert status == [2] and "ready:" not in out
  assert err.strip().splitlines()[-1].startswith(
      f"error: {tmp_path / 'other'}: built with {world.run} step 1, but the model given is")
  assert "Traceback" not in err
  # Search options are checked as `query` checks them, before anything is loaded.
  assert cli.main(["serve", "--index", str(world.index), "--nprobe", "0"]) == 2
  assert capsys.readouterr().err.strip() == "error: --nprobe must be > 0, got 0"


def test_shutdown(served):
  """Ctrl-C: in-flight work finishes, the port closes, `stopped`, exit status 0. (Runs last.)"""
  port = urllib.parse.urlsplit(served.url).port
  assert served.stop() == 0
  assert served.stdout[-1].strip() == "stopped"
  assert "Traceback" not in "".join(served.stderr)
  with pytest.raises(OSError):
    socket.create_connection(("127.0.0.1", port), timeout=5).close()
