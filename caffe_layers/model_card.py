"""Model cards: how to feed a lab's own deploy net and how to read what it returns.

A card is a small YAML or JSON file beside a ``deploy.prototxt`` (keys: ``MODEL_CARD_SCHEMA
.describe()``; defaults are the project's own convention)::

    # DIGITS-style patch classifier, BGR, mean file, 32×32 patches
    channel_order: BGR
    mean_file: mean.binaryproto     # relative to this card's folder
    output: scores                  # no Softmax at the end: apply one
    foreground_class: 1
    patch_classifier: true
    patch_stride: 4                 # classify every 4th pixel's patch, interpolate between

The input follows the steps of pycaffe's ``caffe.io.Transformer``, in its order: RGB 0-255
pixels are channel-swapped (``channel_order``), multiplied by ``raw_scale``, have the mean
(``mean_file`` or ``mean_value``, in the net's channel order and raw-scaled units)
subtracted, then are multiplied by ``input_scale``. Pure numpy; the Caffe side is
:class:`caffe_layers.net.inference.caffe_engine.CaffeSegmenter`.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import yaml

from .image_io import write_atomic
from .param_str import ParamError, parse_param_str
from .schema import Param, Schema

__all__ = ["MODEL_CARD_SCHEMA", "ModelCard", "card_means", "load_model_card", "preprocess", "write_model_card"]

MODEL_CARD_SCHEMA = Schema(
    [
        Param("input_blob", "str", "data", doc="the deploy net's input blob"),
        Param("channel_order", "str", "RGB", choices=("RGB", "BGR"),
              doc="channel order the net was trained on (Caffe's OpenCV-based tools and DIGITS: BGR)"),
        Param("raw_scale", "float", 1.0, min=0.0, min_inclusive=False,
              doc="step 1: pixel values 0-255 are multiplied by this (1/255 for a net trained on 0-1 images)"),
        Param("mean_file", "str", None, optional=True,
              doc="step 2: a .binaryproto mean (net channel order, raw-scaled units) subtracted; "
                  "relative to the card's folder"),
        Param("mean_value", "floats", None, optional=True, min=-1e6, max=1e6,
              doc="step 2, or: per-channel means (net channel order, raw-scaled units) subtracted"),
        Param("input_scale", "float", 1.0, min=0.0, min_inclusive=False,
              doc="step 3: multiplied last (transform_param { scale } after its mean)"),
        Param("output_blob", "str", "prob", doc="the blob holding the class map or class scores"),
        Param("output", "str", "probabilities", choices=("probabilities", "scores"),
              doc="probabilities (a softmax) or raw scores (a softmax over channels is applied)"),
        Param("foreground_class", "int", 1, min=0, max=1023, doc="output channel of the nucleus class"),
        Param("patch_classifier", "bool", False,
              doc="the net maps a P×P patch (its input size) to class scores for the centre pixel"),
        Param("patch_stride", "int", 1, min=1, max=256,
              doc="with patch_classifier: classify the patch centred on every this-many-th pixel of each row "
                  "and column and interpolate between them (stride² fewer forward passes; 1: every pixel)"),
        Param("size_multiple", "int", 1, min=1, max=1024, doc="input sides must be multiples of this"),
        Param("mpp", "float", None, optional=True, min=0.0, min_inclusive=False, max=1000.0,
              doc="micrometres per pixel of the images the net was trained on: whole slides are segmented "
                  "at the pyramid level nearest to it"),
    ],
    name="model card",
)
"""Keys of a model card: how to feed a deploy net and read its output (see :mod:`caffe_layers.model_card`)."""

#: Model cards larger than this are refused unread.
MAX_CARD_BYTES = 64 * 1024


@dataclasses.dataclass(frozen=True)
class ModelCard:
    """A validated model card (see the module docstring); ``mean_file`` is an absolute path."""

    input_blob: str = "data"
    channel_order: str = "RGB"
    raw_scale: float = 1.0
    mean_file: str | None = None
    mean_value: tuple | None = None
    input_scale: float = 1.0
    output_blob: str = "prob"
    output: str = "probabilities"
    foreground_class: int = 1
    patch_classifier: bool = False
    patch_stride: int = 1
    size_multiple: int = 1
    mpp: float | None = None
    source: str = "defaults"

    def as_dict(self):
        """The card's keys and values (what :func:`write_model_card` writes)."""
        values = {field.name: getattr(self, field.name) for field in dataclasses.fields(self) if field.name != "source"}
        if values["mean_value"] is not None:
            values["mean_value"] = list(values["mean_value"])
        return values


def _read_card_text(path):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model card not found: {path}")
    if path.stat().st_size > MAX_CARD_BYTES:
        raise ValueError(f"model card {path} is larger than {MAX_CARD_BYTES} bytes; is it the right file?")
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"model card {path} is not a text (YAML or JSON) file") from None


def load_model_card(path=None, **overrides):
    """Read and validate a model card, with ``overrides`` (e.g. command-line flags) on top.

    Parameters
    ----------
    path : path, optional
        YAML or JSON card; None starts from the defaults.
    **overrides
        Card keys; None values are ignored (a flag that was not given).

    Returns
    -------
    ModelCard
        ``mean_file`` resolved against the card's folder (an override's against the
        working directory).

    Raises
    ------
    ParamError
        For an unknown key (with the closest valid one suggested), a bad value, or both
        ``mean_file`` and ``mean_value``.
    """
    where = "model card" if path is None else f"model card {path}"
    raw = {} if path is None else parse_param_str(_read_card_text(path), where)
    card_mean = raw.get("mean_file")
    given = {key: value for key, value in overrides.items() if value is not None}
    values = MODEL_CARD_SCHEMA.validate({**raw, **given}, where)
    if values["mean_file"] is not None and values["mean_value"] is not None:
        raise ParamError(f"{where}: give mean_file or mean_value, not both", where=where, key="mean_value",
                         value=values["mean_value"])
    mean_file = values["mean_file"]
    if mean_file is not None:
        base = Path(path).parent if (path is not None and "mean_file" not in given and mean_file == card_mean) \
            else Path.cwd()
        mean_path = Path(mean_file) if Path(mean_file).is_absolute() else base / mean_file
        if not mean_path.is_file():
            raise FileNotFoundError(f"{where}: mean_file {mean_file!r} not found (looked for {mean_path})")
        values["mean_file"] = str(mean_path.resolve())
    if values["patch_stride"] > 1:
        if not values["patch_classifier"]:
            raise ParamError(f"{where}: patch_stride {values['patch_stride']} needs patch_classifier: true",
                             where=where, key="patch_stride", value=values["patch_stride"])
        # Tiles start on multiples of size_multiple: on the stride's grid too, so that every
        # tile (and slide block) samples the same pixels.
        size_multiple, stride = values["size_multiple"], values["patch_stride"]
        multiple = size_multiple * stride // math.gcd(size_multiple, stride)  # math.lcm is Python 3.9+
        if multiple > 1024:
            raise ParamError(f"{where}: size_multiple {values['size_multiple']} and patch_stride "
                             f"{values['patch_stride']} need tiles on multiples of {multiple} (at most 1024)",
                             where=where, key="patch_stride", value=values["patch_stride"])
        values["size_multiple"] = multiple
    return ModelCard(source=where, **values)


def write_model_card(path, card, *, overwrite=False, comment=None):
    """Write a card (a :class:`ModelCard` or a dict of its keys) as YAML (``.yaml``/``.yml``) or JSON."""
    values = card.as_dict() if isinstance(card, ModelCard) else dict(card)
    MODEL_CARD_SCHEMA.validate(values, f"model card for {path}")
    path = Path(path)
    if path.suffix.lower() in (".yaml", ".yml"):
        text = (f"# {comment}\n" if comment else "") + yaml.safe_dump(values, sort_keys=False)
    elif path.suffix.lower() == ".json":
        text = json.dumps(values, indent=2) + "\n"
    else:
        raise ValueError(f"{path}: a model card is a .yaml, .yml or .json file")
    return write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), overwrite=overwrite)


def preprocess(batch, card, mean=None):
    """RGB 0-255 tiles -> the net's input, in the order of pycaffe's Transformer.

    Parameters
    ----------
    batch : ndarray, shape (N, 3, h, w)
        RGB in 0-255.
    card : ModelCard
    mean : ndarray, shape (C,) or (C, h, w), optional
        The mean in the net's channel order and raw-scaled units (``mean_value``, or the mean
        file: subtracted pixel by pixel when its size is the tile's, else its channel means).

    Returns
    -------
    ndarray of float32, shape (N, 3, h, w)
    """
    out = np.asarray(batch, dtype=np.float32)
    if card.channel_order == "BGR":
        out = out[:, ::-1]
    out = out * np.float32(card.raw_scale) if card.raw_scale != 1 else out.copy()
    if mean is not None:
        mean = np.asarray(mean, dtype=np.float32)
        if mean.ndim == 3 and mean.shape[1:] != out.shape[2:]:
            mean = mean.mean(axis=(1, 2))
        out -= mean[:, None, None] if mean.ndim == 1 else mean
    if card.input_scale != 1:
        out *= np.float32(card.input_scale)
    return np.ascontiguousarray(out)


def card_means(card, read_mean_file=None):
    """The mean :func:`preprocess` subtracts: ``mean_value``, the mean file's array, or None."""
    if card.mean_value is not None:
        return np.asarray(card.mean_value, np.float32)
    if card.mean_file is not None:
        if read_mean_file is None:
            raise ValueError("reading a mean file needs read_mean_file (caffe_layers.net.meanfile)")
        return read_mean_file(card.mean_file)
    return None

