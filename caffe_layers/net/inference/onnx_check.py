"""Converted nets checked against their source: fp32 ONNX against Caffe on a probe tile, int8 against fp32.

What ``caffe-stain-export`` reports: :func:`check_against_caffe` (max |Δp| on the probe tile of
:func:`caffe_layers.net.inference.engines.probe_tile`) and :func:`quantize_int8` (static
quantisation by ``onnxruntime.quantization``: QDQ format, int8 weights per output channel,
activations calibrated on tiles of the user's images) with, on those images, the largest and
mean probability difference and the Dice of the int8 mask against the fp32 mask.
"""
from __future__ import annotations

import os
import tempfile

import numpy as np

from ...metrics import dice
from ...tiling import DEFAULT_THRESHOLD, segment_tiled
from .caffe_engine import CaffeSegmenter
from .engines import probe_tile
from .onnx_engine import import_onnxruntime, session

__all__ = ["calibration_tiles", "check_against_caffe", "compare_models", "quantize_int8"]


def _run(model_session):
    name, output = model_session.get_inputs()[0].name, model_session.get_outputs()[0].name
    return lambda batch: model_session.run([output], {name: np.ascontiguousarray(batch, np.float32)})[0]


def check_against_caffe(deploy, weights, model_bytes, side=256, batch=1):
    """Largest |Δp| between Caffe and the ONNX model on a ``batch×3×side×side`` probe tile."""
    probe = probe_tile(side, side, batch=batch)
    expected = CaffeSegmenter(deploy, weights)(probe)
    got = _run(session(model_bytes, threads=None))(probe)
    if got.shape != expected.shape:
        raise ValueError(f"the ONNX model gives shape {got.shape}, Caffe {expected.shape}, on the probe")
    return float(np.abs(got.astype(np.float64) - expected).max())


def calibration_tiles(images, side, per_image=8, seed=0):
    """Up to ``per_image`` random ``1×3×side×side`` float32 tiles of each RGB image (seeded)."""
    rng = np.random.default_rng(seed)
    tiles = []
    for rgb in images:
        height, width = rgb.shape[:2]
        h, w = min(side, height), min(side, width)
        for _ in range(per_image):
            y, x = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
            tile = np.asarray(rgb[y:y + h, x:x + w, :3], np.float32).transpose(2, 0, 1)[None]
            tiles.append(np.ascontiguousarray(tile))
    return tiles


def quantize_int8(model_bytes, tiles):
    """Static int8 (QDQ, per-channel weights) of an fp32 ONNX model, calibrated on ``tiles``; returns bytes."""
    import_onnxruntime()
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    input_name = session(model_bytes).get_inputs()[0].name

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter(tiles)

        def get_next(self):
            tile = next(self.items, None)
            return None if tile is None else {input_name: tile}

    with tempfile.TemporaryDirectory(prefix="caffe-stain-int8-") as folder:
        fp32, prepared, int8 = (os.path.join(folder, name) for name in ("fp32.onnx", "pre.onnx", "int8.onnx"))
        with open(fp32, "wb") as handle:
            handle.write(model_bytes)
        quant_pre_process(fp32, prepared, skip_symbolic_shape=True)
        quantize_static(prepared, int8, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
        with open(int8, "rb") as handle:
            return handle.read()


def compare_models(fp32_bytes, int8_bytes, images, tile, overlap, multiple, threshold=DEFAULT_THRESHOLD):
    """Per image: max and mean |Δp| of int8 against fp32 (tiled as the tools tile) and the masks' Dice."""
    fp32, int8 = _run(session(fp32_bytes)), _run(session(int8_bytes))
    rows = []
    for rgb in images:
        reference = segment_tiled(fp32, rgb, tile=tile, overlap=overlap, multiple=multiple)
        quantised = segment_tiled(int8, rgb, tile=tile, overlap=overlap, multiple=multiple)
        difference = np.abs(quantised.astype(np.float64) - reference)
        rows.append({"max_abs_diff": float(difference.max()), "mean_abs_diff": float(difference.mean()),
                     "mask_dice": float(dice(quantised > threshold, reference > threshold))})
    return rows
