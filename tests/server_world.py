"""A tiny searchable world for the service tests: real video files, a trained run, an index, and
the real `python -m prvr_jax.search serve` command running on a loopback port.

Videos are WebM/VP8 (every Chromium plays them) written with PyAV: each second is one scene of a
known colour with a moving bright disc, so a thumbnail can be checked against the frame the video
shows at that time. The run is the tiny synthetic config trained for one step at the tiny CLIP's
width (P = 8); its results mean nothing, the plumbing is what is tested.

  python -m tests.server_world DIR                 # builds the world in DIR and serves it
  python -m tests.server_world DIR docs/search_page.png   # ... and takes the README's screenshot
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from typing import Iterator, Optional, Sequence

import av
import h5py
import numpy as np
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.support.ui import WebDriverWait

from prvr_jax import extract
from prvr_jax.search import cli
from prvr_jax.train.loop import train_and_evaluate
from tests.conftest import REPO_ROOT
from tests.test_extract import write_tiny_clip
from tests.train_helpers import tiny_config

P = 8  # the tiny CLIP's projection width
RATE = 10  # frames per second of the test videos
SIZE = (72, 128)  # height, width
# video id -> scene colours, one per second (RGB).
SCENES = {
    "beach_sunset": [(250, 140, 40), (230, 90, 60), (120, 60, 140), (60, 40, 110), (250, 170, 60)],
    "city_night": [(20, 30, 80), (240, 200, 60), (30, 40, 100), (200, 60, 60)],
    "forest_trail": [(30, 120, 50), (90, 160, 60), (120, 90, 40), (40, 100, 40), (160, 200, 90),
                     (60, 140, 70)],
    "red_car_race": [(200, 30, 30), (120, 120, 130), (220, 40, 40), (90, 90, 100)],
    "snow_mountain": [(230, 240, 250), (140, 180, 230), (250, 250, 255), (100, 140, 200),
                      (210, 225, 245)],
}


def scene_frame(colours: Sequence[tuple[int, int, int]], index: int) -> np.ndarray:
  """Frame `index` (at RATE fps) of a video: its second's colour, shaded top to bottom, with a
  bright disc moving left to right. (H, W, 3) uint8."""
  h, w = SIZE
  base = np.asarray(colours[(index // RATE) % len(colours)], np.float32)
  shade = np.linspace(1.1, 0.8, h, dtype=np.float32)[:, None, None]
  image = np.broadcast_to(base * shade, (h, w, 3)).copy()
  yy, xx = np.mgrid[0:h, 0:w]
  cx, cy = (index % RATE + 0.5) / RATE * w, h * 0.45
  disc = (xx - cx) ** 2 + (yy - cy) ** 2 < (h * 0.12) ** 2
  image[disc] = 0.5 * image[disc] + 0.5 * 255
  return np.clip(image, 0, 255).astype(np.uint8)


def write_scene_video(path: pathlib.Path, colours: Sequence[tuple[int, int, int]]) -> None:
  """A WebM (VP8) of len(colours) seconds at RATE fps."""
  with av.open(str(path), "w") as container:
    stream = container.add_stream("libvpx", rate=RATE)
    stream.height, stream.width = SIZE
    stream.pix_fmt = "yuv420p"
    stream.options = {"deadline": "realtime", "cpu-used": "8"}
    for i in range(len(colours) * RATE):
      frame = av.VideoFrame.from_ndarray(scene_frame(colours, i), format="rgb24")
      for packet in stream.encode(frame):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)


@dataclasses.dataclass
class World:
  """Paths of a built world.

  Attributes:
    clip: the tiny CLIP checkpoint directory.
    videos: the --videos directory (the indexed files, plus the attack files when built with them).
    run: the trained workdir.
    index: the index of every video file extracted from `videos`.
    features: their features (`python -m prvr_jax.extract videos`).
    durations: {video id: seconds} as extraction measured them.
    outside: a directory beside `videos` (the target of the link that leads out).
  """

  clip: pathlib.Path
  videos: pathlib.Path
  run: pathlib.Path
  index: pathlib.Path
  features: pathlib.Path
  durations: dict[str, float]
  outside: pathlib.Path


def train_tiny_run(workdir: pathlib.Path) -> None:
  """The tiny synthetic config at width P, one training step, no test-split evaluation."""
  config = tiny_config()
  config.data.synthetic.visual_dim = config.data.synthetic.text_dim = P
  config.train.max_steps = 1
  config.eval.diagnostics = False
  config.eval.final_splits = ()
  train_and_evaluate(config, str(workdir), progress=False)


def build_world(root: pathlib.Path, attacks: bool = True) -> World:
  """Writes the videos, extracts their features, trains the run and builds the index.

  With `attacks`, --videos also holds `escape.webm`, a link to a video outside it (extracted
  and indexed like the others, but never to be served), and after the index is built
  `stranger.webm`, a video that is not in the index.
  """
  clip = write_tiny_clip(root / "clip")
  videos, outside = root / "videos", root / "outside"
  videos.mkdir()
  outside.mkdir()
  for name, colours in SCENES.items():
    write_scene_video(videos / f"{name}.webm", colours)
  if attacks:
    # The link's target is a copy of beach_sunset: equal features, equal scores, and ties rank
    # the smaller id first, so `escape` is never the top hit (the page starts the top hit).
    (outside / "secret.webm").write_bytes((videos / "beach_sunset.webm").read_bytes())
    (videos / "escape.webm").symlink_to(outside / "secret.webm")
  features = root / "videos.h5"
  assert extract.main(["videos", "--clip", str(clip), "--videos", str(videos), "--fps", "2",
                       "--out", str(features), "--quiet"]) == 0
  with h5py.File(features, "r") as f:
    durations = {name: float(f[name].attrs["duration"]) for name in f}
  run = root / "run"
  train_tiny_run(run)
  index = root / "index"
  assert cli.main(["index", "--workdir", str(run), "--features", str(features), "--out",
                   str(index), "--chunk", "4", "--quiet"]) == 0
  if attacks:
    write_scene_video(videos / "stranger.webm", [(0, 255, 255)] * 2)
  return World(clip, videos, run, index, features, durations, outside)


class ServeProcess:
  """`python -m prvr_jax.search serve ... --port 0` in a subprocess, until `stop`.

  Attributes:
    url: http://127.0.0.1:PORT (from the command's `ready:` line).
    ready_line: that line.
  """

  def __init__(self, args: Sequence[str], timeout: float = 300.0):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    self.proc = subprocess.Popen(  # pylint: disable=consider-using-with
        [sys.executable, "-m", "prvr_jax.search", "serve", *args, "--port", "0"], cwd=REPO_ROOT,
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    self._lines: queue.Queue[Optional[str]] = queue.Queue()
    self.stdout: list[str] = []
    self.stderr: list[str] = []
    threading.Thread(target=self._pump, args=(self.proc.stdout, self.stdout, True),
                     daemon=True).start()
    threading.Thread(target=self._pump, args=(self.proc.stderr, self.stderr, False),
                     daemon=True).start()
    deadline = time.monotonic() + timeout
    self.ready_line = ""
    while time.monotonic() < deadline:
      try:
        line = self._lines.get(timeout=1.0)
      except queue.Empty:
        continue
      if line is None:
        break
      if line.startswith("ready: "):
        self.ready_line = line
        break
    match = re.match(r"ready: (http://\S+?)/? ", self.ready_line)
    if not match:
      self.proc.kill()
      self.proc.wait()
      time.sleep(0.2)
      raise RuntimeError(f"serve did not become ready (exit {self.proc.returncode}):\n"
                         + "".join(self.stdout) + "".join(self.stderr))
    self.url = match.group(1)

  def _pump(self, stream, sink: list[str], forward: bool) -> None:
    for line in stream:
      sink.append(line)
      if forward:
        self._lines.put(line)
    if forward:
      self._lines.put(None)

  def stop(self, timeout: float = 30.0) -> int:
    """SIGINT (Ctrl-C), then the exit status once it has shut down."""
    if self.proc.poll() is None:
      self.proc.send_signal(signal.SIGINT)
    try:
      return self.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      self.proc.kill()
      self.proc.wait()
      raise


@contextlib.contextmanager
def serving(args: Sequence[str]) -> Iterator[ServeProcess]:
  server = ServeProcess(args)
  try:
    yield server
  finally:
    server.stop()


def serve_args(world: World, videos: bool = True) -> list[str]:
  args = ["--index", str(world.index), "--clip", str(world.clip), "--max-batch", "4",
          "--max-k", "20", "--max-query-chars", "200"]
  return args + (["--videos", str(world.videos)] if videos else [])


CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# Headless, and nothing that reaches out of the machine or needs a sandbox (CI runs as root).
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run",
                  "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio")


def headless_chromium(profile: pathlib.Path, width: int = 1280, height: int = 860):
  """Debian's chromium driven by selenium through Debian's chromedriver, in a fresh profile."""
  options = webdriver.ChromeOptions()
  options.binary_location = CHROMIUM
  for flag in CHROMIUM_FLAGS:
    options.add_argument(flag)
  options.add_argument(f"--window-size={width},{height}")
  options.add_argument(f"--user-data-dir={profile}")
  return webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))


def screenshot(url: str, query: str, out: pathlib.Path, profile: pathlib.Path) -> None:
  """The page with the results of `query`, its player at the top hit's moment, as a PNG."""
  driver = headless_chromium(profile)
  try:
    driver.get(f"{url}/?q={urllib.parse.quote(query)}&k=6")
    WebDriverWait(driver, 60).until(lambda d: d.execute_script(
        "const v = document.getElementById('player');"
        "return v.dataset.state === 'ready' && v.readyState >= 2 && "
        "[...document.querySelectorAll('img.thumb')].every(i => i.complete)"))
    time.sleep(2)  # the player's loading indicator fades out after the seek
    driver.save_screenshot(str(out))
  finally:
    driver.quit()


if __name__ == "__main__":
  # python -m tests.server_world DIR [SCREENSHOT.png]: build the world in DIR (empty or new) and
  # serve it until Ctrl-C, or take the README's screenshot of it.
  target = pathlib.Path(sys.argv[1])
  target.mkdir(parents=True, exist_ok=True)
  built = build_world(target, attacks=False)
  with serving(serve_args(built)) as running:
    print(running.ready_line, end="", flush=True)
    if len(sys.argv) > 2:
      screenshot(running.url, "a red car races past at night", pathlib.Path(sys.argv[2]),
                 target / "chromium-profile")
    else:
      try:
        while running.proc.poll() is None:
          time.sleep(1)
      except KeyboardInterrupt:
        pass
