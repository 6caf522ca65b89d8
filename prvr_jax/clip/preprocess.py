"""CLIP image preprocessing, as OpenAI's `clip.load(...)[1]`: bicubic resize of the shorter side,
center crop, scale to [0, 1], normalise with CLIP's mean and std.

The resize is Pillow's bicubic (with its antialiasing on downscale) on uint8 RGB, as in the
original, so pixels match it exactly; the rest is numpy. The crop offset is
round((size - crop) / 2) as in torchvision; transformers' CLIPImageProcessor floors instead, which
differs by one pixel only when that difference is odd.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


def resize_shorter_side(image: np.ndarray, size: int) -> np.ndarray:
  """Bicubic resize so that the shorter side is `size`, keeping the aspect ratio.

  Args:
    image: (H, W, 3) uint8 RGB.
    size: target length of the shorter side.

  Returns:
    (h, w, 3) uint8 with min(h, w) == size; the longer side is int(size * long / short).
  """
  h, w = image.shape[:2]
  if h <= w:
    new_h, new_w = size, int(size * w / h)
  else:
    new_h, new_w = int(size * h / w), size
  if (new_h, new_w) == (h, w):
    return image
  return np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BICUBIC))


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
  """Central (size, size) window of an (H, W, C) image with H, W >= size."""
  h, w = image.shape[:2]
  top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
  return image[top:top + size, left:left + size]


def resize_and_crop(image: np.ndarray, size: int) -> np.ndarray:
  """(H, W, 3) uint8 RGB -> (size, size, 3) uint8: shorter side to `size`, then center crop."""
  if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
    raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {image.shape} {image.dtype}")
  return center_crop(resize_shorter_side(image, size), size)


def normalize(images: np.ndarray) -> np.ndarray:
  """(..., 3) uint8 -> float32 (x / 255 - mean) / std, the model's pixel_values (NHWC)."""
  return (images.astype(np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD


def preprocess_images(images: np.ndarray | list[np.ndarray], size: int) -> np.ndarray:
  """Full preprocessing of a list of images of any sizes.

  Args:
    images: N (H_i, W_i, 3) uint8 RGB images.
    size: the model's image_size.

  Returns:
    (N, size, size, 3) float32 pixel_values.
  """
  crops = [resize_and_crop(np.asarray(im), size) for im in images]
  if not crops:
    return np.zeros((0, size, size, 3), np.float32)
  return normalize(np.stack(crops))
