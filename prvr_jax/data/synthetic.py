"""A synthetic PRVR benchmark: untrimmed videos of several events, captions of single events.

Generative story (all draws from `SyntheticSpec.seed`, each video from its own seeded stream, so a
video does not change when the number of videos does):

1. A concept space. Concepts are (action, object) pairs, e.g. "holds dog", "walks dog", "holds
   cup". A concept's latent vector is the normalised sum of its object's and its action's latent
   vectors, so concepts sharing an object (or an action) are close and others are not. An event
   adds an attribute ("brown") to a concept: z = normalise(concept + attribute_weight * attribute).
2. A video is T frames (uniform in [min_frames, max_frames]) cut into 2-6 events of varied length
   (Dirichlet proportions, at least 2 frames each), each with a concept drawn from all concepts, so
   concepts recur across videos ("holding a dog" appears in many videos, with other attributes
   and other companions).
3. Frame features live in a 'visual' space of size visual_dim: a fixed random projection of z,
   plus a slow random-walk drift within the event, white noise per frame, a per-video background
   vector and a component common to all videos (CLIP features share a large mean direction).
4. A caption describes one event ("a woman holds a brown dog"); its moment is the event's time
   span. Its token features live in a separate 'CLIP' space of size text_dim: an [SOS] row shared
   by all captions, one row per word (word vectors: projections of the object / action /
   attribute latents for content words, random vectors for filler words, plus noise), and an
   [EOS] row near the projection of z (caption_noise away): the CLIP sentence embedding that TCPL
   distils from.

Retrieval is solvable far above chance (a query names a concept and an attribute that few other
videos share), but near concepts and recurring concepts make many hard negatives, which is where
semantic collapse shows. `caption_concepts` stores every caption's concept id so that collapse
can be measured. Pure numpy; no JAX.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Iterator

import numpy as np

from prvr_jax.data.builders.records import VideoRecord
from prvr_jax.errors import ConfigError

_OBJECTS = ("dog", "cup", "guitar", "bicycle", "ball", "book", "phone", "car", "door", "laptop",
            "umbrella", "chair", "bottle", "horse", "kite", "knife")
_ACTIONS = ("holds", "walks", "cleans", "throws", "opens", "watches", "carries", "paints")
_ATTRIBUTES = ("brown", "red", "black", "white", "green", "blue", "yellow", "grey", "small",
               "large", "old", "new")
_SUBJECTS = ("a man", "a woman", "a child", "someone", "a person", "the host")
_FILLERS = ("then", "slowly", "again", "quickly", "carefully", "outside", "inside")
_SPLIT_CODES = {"train": 1, "val": 2, "test": 3}


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
  """Sizes, noise levels and seed of the synthetic benchmark (config: data.synthetic)."""

  seed: int = 0
  num_train_videos: int = 400
  num_val_videos: int = 100
  num_test_videos: int = 100
  num_objects: int = 12
  num_actions: int = 4
  num_attributes: int = 8
  latent_dim: int = 32
  visual_dim: int = 64
  text_dim: int = 64
  min_events: int = 2
  max_events: int = 6
  min_frames: int = 32
  max_frames: int = 192
  frames_per_second: float = 2.0
  object_weight: float = 1.0
  action_weight: float = 0.8
  attribute_weight: float = 0.7
  frame_noise: float = 1.0
  drift: float = 0.5
  background: float = 0.5
  common_visual: float = 1.0
  word_noise: float = 0.3
  caption_noise: float = 0.5
  common_text: float = 0.5

  def __post_init__(self):
    if not 1 <= self.num_objects <= len(_OBJECTS):
      raise ConfigError(f"num_objects must be in [1, {len(_OBJECTS)}], got {self.num_objects}")
    if not 1 <= self.num_actions <= len(_ACTIONS):
      raise ConfigError(f"num_actions must be in [1, {len(_ACTIONS)}], got {self.num_actions}")
    if not 1 <= self.num_attributes <= len(_ATTRIBUTES):
      raise ConfigError(f"num_attributes must be in [1, {len(_ATTRIBUTES)}], got {self.num_attributes}")
    if not 1 <= self.min_events <= self.max_events <= self.num_concepts:
      raise ConfigError(f"need 1 <= min_events <= max_events <= num_concepts, got "
                       f"{self.min_events}, {self.max_events}, {self.num_concepts}")
    if self.min_frames < 2 * self.max_events or self.max_frames < self.min_frames:
      raise ConfigError(f"need 2 * max_events <= min_frames <= max_frames, got {self.min_frames}, "
                       f"{self.max_frames} for up to {self.max_events} events")

  @property
  def num_concepts(self) -> int:
    """Number of (action, object) concepts."""
    return self.num_objects * self.num_actions

  def num_videos(self, split: str) -> int:
    """Videos of 'train', 'val' or 'test'."""
    return {"train": self.num_train_videos, "val": self.num_val_videos,
            "test": self.num_test_videos}[split]

  def fingerprint(self) -> str:
    """Short hash of every field: the builder config name, so other settings build elsewhere."""
    blob = json.dumps(dataclasses.asdict(self), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:10]

  @classmethod
  def from_dict(cls, values: dict[str, Any]) -> "SyntheticSpec":
    """From a config dict; unknown keys are an error (a typo would otherwise be ignored)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
      raise ConfigError(f"unknown data.synthetic keys {unknown}; known: {sorted(names)}")
    return cls(**values)


def _unit(x: np.ndarray) -> np.ndarray:
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


@dataclasses.dataclass
class World:
  """Everything shared by all videos: concept latents, projections, word vectors.

  Attributes:
    object_latent: (num_objects, latent) unit vectors.
    action_latent: (num_actions, latent).
    attribute_latent: (num_attributes, latent).
    concept_latent: (num_concepts, latent) unit; concept c = (object c // A, action c % A).
    visual_proj: (latent, visual_dim) projection into the visual space.
    text_proj: (latent, text_dim) projection into the 'CLIP' space.
    common_visual: (visual_dim,), common_text: (text_dim,) shared components.
    sos: (text_dim,) the [SOS] row.
    filler_words: word -> (text_dim,) vectors of non-content words.
  """

  object_latent: np.ndarray
  action_latent: np.ndarray
  attribute_latent: np.ndarray
  concept_latent: np.ndarray
  visual_proj: np.ndarray
  text_proj: np.ndarray
  common_visual: np.ndarray
  common_text: np.ndarray
  sos: np.ndarray
  filler_words: dict[str, np.ndarray]

  def concept_name(self, c: int, spec: SyntheticSpec) -> str:
    """'<action> <object>' of concept c."""
    return f"{_ACTIONS[c % spec.num_actions]} {_OBJECTS[c // spec.num_actions]}"


def make_world(spec: SyntheticSpec) -> World:
  """The shared part of the benchmark, from the seed alone."""
  rng = np.random.default_rng([spec.seed, 0])
  obj = _unit(rng.normal(size=(spec.num_objects, spec.latent_dim)))
  act = _unit(rng.normal(size=(spec.num_actions, spec.latent_dim)))
  attr = _unit(rng.normal(size=(spec.num_attributes, spec.latent_dim)))
  concept = _unit(spec.object_weight * obj[:, None, :] + spec.action_weight * act[None, :, :])
  concept = concept.reshape(spec.num_concepts, spec.latent_dim)
  # Projections are followed by a normalisation wherever they are used, so their scale is moot.
  visual_proj = rng.normal(size=(spec.latent_dim, spec.visual_dim)) / np.sqrt(spec.latent_dim)
  text_proj = rng.normal(size=(spec.latent_dim, spec.text_dim)) / np.sqrt(spec.latent_dim)
  words = sorted(set(w for phrase in _SUBJECTS for w in phrase.split()) | set(_FILLERS))
  fillers = {w: _unit(rng.normal(size=spec.text_dim)) for w in words}
  return World(obj, act, attr, concept, visual_proj, text_proj,
               _unit(rng.normal(size=spec.visual_dim)), _unit(rng.normal(size=spec.text_dim)),
               _unit(rng.normal(size=spec.text_dim)), fillers)


def _event_bounds(rng: np.random.Generator, num_frames: int, num_events: int) -> np.ndarray:
  """(num_events + 1,) increasing frame boundaries, every event at least 2 frames long."""
  spare = num_frames - 2 * num_events
  share = rng.dirichlet(np.full(num_events, 1.5))
  lengths = 2 + np.floor(share * spare).astype(np.int64)
  lengths[-1] += num_frames - lengths.sum()  # the floor's remainder goes to the last event
  return np.concatenate([[0], np.cumsum(lengths)])


def _caption(rng: np.random.Generator, world: World, spec: SyntheticSpec, concept: int,
             attribute: int, z: np.ndarray) -> tuple[str, np.ndarray]:
  """Text and (L, text_dim) token features of a caption of an event with latent z."""
  obj, act = divmod(concept, spec.num_actions)
  subject = _SUBJECTS[rng.integers(len(_SUBJECTS))]
  words = subject.split() + [_ACTIONS[act], "a", _ATTRIBUTES[attribute], _OBJECTS[obj]]
  if rng.random() < 0.5:
    words.append(_FILLERS[rng.integers(len(_FILLERS))])
  content = {_ACTIONS[act]: world.action_latent[act],
             _ATTRIBUTES[attribute]: world.attribute_latent[attribute],
             _OBJECTS[obj]: world.object_latent[obj]}
  rows = [world.sos]
  for w in words:
    base = (_unit(content[w] @ world.text_proj) if w in content
            else world.filler_words.get(w, world.filler_words["a"]))
    rows.append(base + spec.word_noise * rng.normal(size=spec.text_dim) / np.sqrt(spec.text_dim))
  eos_noise = rng.normal(size=spec.text_dim) / np.sqrt(spec.text_dim)
  eos = _unit(z @ world.text_proj) + spec.caption_noise * eos_noise
  rows.append(eos)
  tokens = np.stack(rows) + spec.common_text * world.common_text
  return " ".join(words), tokens.astype(np.float32)


def make_video(spec: SyntheticSpec, world: World, split: str, index: int) -> VideoRecord:
  """Video `index` of `split`, from its own random stream."""
  rng = np.random.default_rng([spec.seed, _SPLIT_CODES[split], index])
  num_frames = int(rng.integers(spec.min_frames, spec.max_frames + 1))
  num_events = int(rng.integers(spec.min_events, spec.max_events + 1))
  bounds = _event_bounds(rng, num_frames, num_events)
  concepts = rng.choice(spec.num_concepts, size=num_events, replace=False)
  attributes = rng.integers(spec.num_attributes, size=num_events)
  d = spec.visual_dim
  background = spec.background * rng.normal(size=d) / np.sqrt(d)
  frames = np.empty((num_frames, d), np.float64)
  vid = f"{split}{index:05d}"
  caption_ids, texts, tokens, moments = [], [], [], []
  for e in range(num_events):
    start, end = int(bounds[e]), int(bounds[e + 1])
    length = end - start
    z = _unit(world.concept_latent[concepts[e]]
              + spec.attribute_weight * world.attribute_latent[attributes[e]])
    event_visual = _unit(z @ world.visual_proj)
    steps = rng.normal(size=(length, d)) * (spec.drift / np.sqrt(length * d))
    noise = rng.normal(size=(length, d)) * (spec.frame_noise / np.sqrt(d))
    frames[start:end] = event_visual + np.cumsum(steps, axis=0) + noise
    text, tok = _caption(rng, world, spec, int(concepts[e]), int(attributes[e]), z)
    caption_ids.append(f"{vid}#enc#{e}")
    texts.append(text)
    tokens.append(tok)
    moments.append((start / spec.frames_per_second, end / spec.frames_per_second))
  frames += background + spec.common_visual * world.common_visual
  return VideoRecord(video_id=vid, feature_key=vid, frames=frames.astype(np.float32),
                     caption_ids=caption_ids, caption_texts=texts, caption_tokens=tokens,
                     moments=np.asarray(moments, np.float32),
                     duration=num_frames / spec.frames_per_second,
                     caption_concepts=concepts.astype(np.int32))


def generate_split(spec: SyntheticSpec, split: str, world: World | None = None) -> Iterator[VideoRecord]:
  """All videos of a split, in index order."""
  world = world if world is not None else make_world(spec)
  for i in range(spec.num_videos(split)):
    yield make_video(spec, world, split, i)


def concept_table(spec: SyntheticSpec, world: World | None = None) -> dict[str, Any]:
  """Concept ids -> names, objects and actions (stored with the dataset to measure collapse)."""
  world = world if world is not None else make_world(spec)
  ids = range(spec.num_concepts)
  return dict(names=[world.concept_name(c, spec) for c in ids],
              object=[c // spec.num_actions for c in ids], action=[c % spec.num_actions for c in ids])
