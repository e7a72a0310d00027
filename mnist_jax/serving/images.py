"""Images a model is asked about, checked and scaled to float32 (N, 784) in [0, 1].

Accepted: a `.npy` of images, uint8 `(N, 28, 28)` / `(N, 784)` (scaled by
1/255 as in training) or float already in [0, 1]; a 28x28 PNG (any mode,
turned to grayscale); or Vertex AI's online-prediction JSON
`{"instances": [...]}`, each instance 784 or 28x28 numbers, all integers
0..255 (pixels) or else floats in [0, 1], or `{"b64": "<base64>"}` of a 28x28
PNG or 784 raw uint8 pixels. Anything else is a one-line DataError that names
the instance.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import sys
from typing import Any

import numpy as np

from mnist_jax.common import storage
from mnist_jax.common.errors import DataError
from mnist_jax.data.dataset import IMAGE_PIXELS, scale_pixels

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_NPY_MAGIC = b"\x93NUMPY"
# The largest b64 instance: a 28x28 PNG is well under 2 KB; this leaves room for any encoder's choices.
MAX_B64_CHARS = 64 * 1024


def normalize(images: np.ndarray, source: str) -> np.ndarray:
    """uint8 pixels -> /255; floats must already be in [0, 1]. Returns float32 (N, 784)."""
    if images.shape in ((IMAGE_PIXELS,), (28, 28)):
        images = images[None]  # one image
    if images.ndim == 3 and images.shape[1:] == (28, 28):
        images = images.reshape(len(images), IMAGE_PIXELS)
    if images.ndim != 2 or images.shape[1] != IMAGE_PIXELS:
        raise DataError(f"{source}: images must have shape (N, 28, 28) or (N, 784), got {images.shape}")
    if len(images) == 0:
        raise DataError(f"{source}: no images")
    if images.dtype == np.uint8:
        return scale_pixels(images)
    if np.issubdtype(images.dtype, np.floating):
        if not np.all(np.isfinite(images)) or images.min() < 0 or images.max() > 1:
            raise DataError(f"{source}: float images must be in [0, 1], found {images.min():g}..{images.max():g}")
        return images.astype(np.float32)
    raise DataError(f"{source}: images must be uint8 pixels or floats in [0, 1], got dtype {images.dtype}")


def images_from_instances(body: Any, source: str = "request") -> np.ndarray:
    """Vertex AI's `{"instances": [...]}` as float images (N, 784).


    An instance is 784 or 28x28 numbers (all integers: 0..255 pixels; else
    floats in [0, 1]), or `{"b64": ...}`: a base64 PNG (28x28 grayscale) or 784
    raw uint8 pixels. Flat pixel lists are converted all at once; anything else
    is checked one instance at a time, so an error names the instance.
    """
    if not isinstance(body, dict) or "instances" not in body:
        raise DataError(f'{source}: expected a JSON object with an "instances" list')
    instances = body["instances"]
    if not isinstance(instances, list) or not instances:
        raise DataError(f'{source}: "instances" must be a non-empty list')
    try:  # the common case, flat pixel lists: bytes() both converts and checks the range, fast
        if all(type(instance) is list and len(instance) == IMAGE_PIXELS for instance in instances):
            pixels = np.frombuffer(b"".join(bytes(instance) for instance in instances), np.uint8)
            return scale_pixels(pixels.reshape(len(instances), IMAGE_PIXELS))
    except (TypeError, ValueError):  # floats, or out of range: looked at one by one below
        pass
    return np.stack([_instance(instance, f"{source}: instance {i}") for i, instance in enumerate(instances)])


def _instance(instance: Any, source: str) -> np.ndarray:
    if isinstance(instance, dict):
        if set(instance) != {"b64"} or not isinstance(instance["b64"], str):
            raise DataError(f'{source}: an object instance must be {{"b64": "<base64>"}}')
        return _b64_image(instance["b64"], source)
    try:
        array = np.asarray(instance)
    except ValueError:
        raise DataError(f"{source} is not a rectangular array of numbers") from None
    if array.dtype == bool or not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise DataError(f"{source} must hold numbers, got {array.dtype}")
    if array.shape not in ((IMAGE_PIXELS,), (28, 28)):
        raise DataError(f"{source} must be 784 or 28x28 numbers, got shape {array.shape}")
    if np.issubdtype(array.dtype, np.integer):
        if array.min() < 0 or array.max() > 255:
            raise DataError(f"{source} has integer pixels outside 0..255")
        array = array.astype(np.uint8)
    return normalize(array, source)[0]


def _b64_image(text: str, source: str) -> np.ndarray:
    """A base64 PNG or 784 raw pixels; the encoded size is bounded before anything is decoded."""
    if len(text) > MAX_B64_CHARS:
        raise DataError(f"{source}: b64 payload of {len(text)} characters is over {MAX_B64_CHARS}")
    try:
        payload = base64.b64decode(text, validate=True)
    except binascii.Error as e:
        raise DataError(f"{source}: b64 is not valid base64 ({e})") from None
    if payload.startswith(_PNG_MAGIC):
        return _png_image(payload, source)[0]
    if len(payload) == IMAGE_PIXELS:
        return scale_pixels(np.frombuffer(payload, np.uint8))
    raise DataError(f"{source}: b64 holds neither a PNG nor {IMAGE_PIXELS} raw pixels ({len(payload)} bytes)")


def read_image_file(path: str | None) -> np.ndarray:
    """Images from a .npy, a PNG, or instances JSON (a file, or stdin when `path` is None or '-')."""
    if path in (None, "-"):
        source, payload = "stdin", sys.stdin.buffer.read()
    else:
        source = path
        try:
            payload = storage.read_bytes(path)
        except (FileNotFoundError, IsADirectoryError):
            raise DataError(f"cannot read input {path}") from None
    if payload.startswith(_NPY_MAGIC):
        try:
            return normalize(np.load(io.BytesIO(payload), allow_pickle=False), source)
        except ValueError as e:
            raise DataError(f"{source}: unreadable .npy: {e}") from None
    if payload.startswith(_PNG_MAGIC):
        return _png_image(payload, source)
    try:
        body = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise DataError(f"{source}: not a .npy, PNG or JSON file") from None
    return images_from_instances(body, source)


def _png_image(payload: bytes, source: str) -> np.ndarray:
    """A 28x28 PNG as one float image (1, 784), any color mode turned to grayscale."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(payload), formats=["PNG"])
        if image.size != (28, 28):  # checked from the header, before any pixel is decoded
            raise DataError(f"{source}: PNG must be 28x28, got {image.size[0]}x{image.size[1]}")
        image.load()
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise DataError(f"{source}: unreadable PNG: {e}") from None
    pixels = np.asarray(image if image.mode == "L" else image.convert("L"), np.uint8)
    return scale_pixels(pixels.reshape(1, IMAGE_PIXELS))
