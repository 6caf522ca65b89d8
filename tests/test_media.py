"""The files a service may serve: indexed ids only, links followed only while they stay inside."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from prvr_jax.search.errors import SearchError
from prvr_jax.search.media import NotServed, VideoLibrary
from tests.server_world import RATE, scene_frame, write_scene_video

COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]


@pytest.fixture
def tree(tmp_path):
  videos, outside = tmp_path / "videos", tmp_path / "outside"
  videos.mkdir()
  outside.mkdir()
  write_scene_video(videos / "clip.webm", COLOURS)
  (videos / "notes.txt").write_text("not a video")
  (videos / "inside.webm").symlink_to(videos / "clip.webm")  # a link that stays inside: fine
  (outside / "secret.webm").write_bytes((videos / "clip.webm").read_bytes())
  (videos / "out.webm").symlink_to(outside / "secret.webm")
  (videos / "stranger.webm").write_bytes((videos / "clip.webm").read_bytes())
  return videos, outside


def test_only_indexed_files_inside_the_directory_are_served(tree):
  videos, outside = tree
  library = VideoLibrary(videos, ["clip", "inside", "out", "gone", "notes"])
  assert library.path("clip") == (videos / "clip.webm").resolve()
  assert library.path("inside") == (videos / "clip.webm").resolve()
  assert library.missing == ["gone", "notes"]  # no video file of that stem
  assert library.num_servable() == 2
  refusals = {"out": "is a link that leads outside --videos", "stranger": "no such indexed video",
              "gone": "no such indexed video", "../outside/secret": "no such indexed video",
              str(outside / "secret"): "no such indexed video"}
  for video_id, why in refusals.items():
    assert not library.has(video_id)
    with pytest.raises(NotServed, match=why):
      library.path(video_id)
  # A link re-pointed out of the directory after start is refused from then on.
  (videos / "inside.webm").unlink()
  (videos / "inside.webm").symlink_to(outside / "secret.webm")
  with pytest.raises(NotServed, match="leads outside"):
    library.path("inside")
  with pytest.raises(NotServed, match="leads outside"):
    library.thumbnail("inside", 0.0)
  (videos / "clip.webm").unlink()
  with pytest.raises(NotServed, match="gone or not a regular file"):
    library.path("clip")


def test_thumbnails_show_the_frame_at_t_and_are_cached(tree, tmp_path):
  videos, _ = tree
  library = VideoLibrary(videos, ["clip"], width=64)
  for t in (0.25, 1.55, 2.95):
    image = Image.open(io.BytesIO(library.thumbnail("clip", t)))
    assert image.format == "JPEG" and image.width == 64
    frame = scene_frame(COLOURS, int(t * RATE))
    want = np.asarray(frame, np.float32).mean(axis=(0, 1))
    got = np.asarray(image.convert("RGB"), np.float32).mean(axis=(0, 1))
    assert np.abs(got - want).max() < 15, (t, got, want)
  library.thumbnail("clip", 1.55)
  assert library.cache_info()["hits"] == 1 and library.cache_info()["misses"] == 3
  for bad in (-1.0, float("nan"), float("inf")):
    with pytest.raises(SearchError, match="t must be a finite number"):
      library.thumbnail("clip", bad)
  (tmp_path / "broken").mkdir()
  (tmp_path / "broken" / "bad.webm").write_bytes(b"\x1a\x45\xdf\xa3 not really a webm")
  with pytest.raises(SearchError, match=r"video 'bad': cannot decode bad.webm"):
    VideoLibrary(tmp_path / "broken", ["bad"]).thumbnail("bad", 0.0)
  with pytest.raises(SearchError, match="--videos directory not found"):
    VideoLibrary(tmp_path / "nope", ["clip"])
