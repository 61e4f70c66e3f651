"""Segment image files with a ``predict`` callable and write probability, mask and overlay."""
import os
from pathlib import Path

import numpy as np

from ...annotations import write_instance_image
from ...image_io import image_stem, read_rgb, same_file, write_image
from ...instances import instances_from_probability
from ...reports import overlay
from ...resolution import resample_probability, resample_rgb, segmentation_scale
from ...tiling import (DEFAULT_MULTIPLE, DEFAULT_OVERLAP, DEFAULT_THRESHOLD, DEFAULT_TILE, check_threshold,
                      segment_tiled)

__all__ = ["segment_files"]


def segment_files(segmenter, paths, out_dir, tile=DEFAULT_TILE, overlap=DEFAULT_OVERLAP,
                  threshold=DEFAULT_THRESHOLD, multiple=DEFAULT_MULTIPLE, prob_format="png", progress=True,
                  overwrite=False, batch_size=1, model_mpp=None, image_mpp=None, instances=None, log=None):
    """Segment image files and write ``<name>_prob.png|npy``, ``_pred.png``, ``_overlay.png``
    (and ``_instances.png``).

    The predicted mask is ``<name>_pred.png``, never ``<name>_mask.png``: that is the name of
    ground-truth masks (``caffe-stain-prepare`` writes them), which a run on a data folder
    must not replace.

    Memory per image, besides the net and one tile: the image (memory-mapped when
    :func:`~caffe_layers.image_io.read_rgb` can, e.g. an uncompressed TIFF, so its pages are
    page cache; decoded in process memory otherwise, 3 bytes/pixel); the float32 probability
    map (with ``prob_format='npy'`` tiles are written straight into the ``.npy`` file through
    a memory map, so it is file-backed and never an in-memory array; with ``'png'`` it is an
    in-memory array of 4 bytes/pixel, freed once the mask is made); the boolean mask
    (1 byte/pixel); and the uint8 array each PNG is encoded from (PNG needs the whole array:
    1 byte/pixel for the probability and the mask, 3 for the overlay). The overlay step is
    the peak: its image copy, outline erosion temporaries and PIL's copy add about
    10 bytes/pixel (measured on a 4000×4000 image) to the mask.

    Parameters
    ----------
    segmenter : callable
        A ``predict`` callable (e.g. :class:`~caffe_layers.net.inference.caffe_engine.CaffeSegmenter`).
    paths : list of path
    out_dir : path
        Created if missing.
    tile, overlap, threshold, multiple
        See :func:`~caffe_layers.tiling.segment_tiled`; a pixel is nucleus where its
        probability is above ``threshold``.
    prob_format : {'png', 'npy'}
        Probability as uint8 0–255 PNG or float32 ``.npy`` (written tile by tile, see above).
    progress : bool
    overwrite : bool
        Replace outputs that already exist (default: refuse before segmenting anything).
    batch_size : int
        Tiles per forward pass.
    model_mpp : float, optional
        The model card's µm/px: each image is resampled to it from its own resolution
        (:func:`~caffe_layers.resolution.segmentation_scale`), segmented, and its probability
        brought back to the image's size; every output has the input's pixels.
    image_mpp : float, optional
        The images' µm/px, instead of what their files record.
    instances : dict, optional
        Keyword arguments of :func:`~caffe_layers.instances.instances_from_probability`:
        nucleus instances from the probability map at the image's size are written as a
        16-bit ``<name>_instances.png`` (0 background, 1..N nuclei).
    log : callable, optional
        Receives one sentence per image saying at which scale it is segmented.

    Returns
    -------
    list of dict
        Per image: ``name`` and the written paths.
    """
    threshold = check_threshold(threshold)
    if prob_format not in ("png", "npy"):
        raise ValueError(f"prob_format must be 'png' or 'npy', got {prob_format!r}")
    names = [image_stem(p) for p in paths]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"several input images share the name(s) {duplicates}; their outputs "
                         "would overwrite each other")
    out_dir = Path(out_dir)
    outputs = [out_dir / f"{name}{suffix}" for name in names
               for suffix in (f"_prob.{prob_format}", "_pred.png", "_overlay.png")
               + (("_instances.png",) if instances is not None else ())]
    for output in outputs:
        if any(same_file(output, p) for p in paths):
            raise ValueError(f"output {output} would replace one of the input images")
        if not overwrite and output.exists():
            raise FileExistsError(f"{output}: already exists (use --overwrite to replace it)")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for path, name in zip(paths, names):
        rgb = read_rgb(path, memmap=True)  # a large uncompressed TIFF stays on disk
        scale, sentence = segmentation_scale(path, model_mpp, image_mpp)
        if log is not None:
            log(f"{name}: {sentence}")
        tiling = dict(tile=tile, overlap=overlap, multiple=multiple, progress=name if progress else False,
                      batch_size=batch_size)
        files = {"name": name}
        if prob_format == "npy":
            files["prob"] = out_dir / f"{name}_prob.npy"
            # Tiles go straight into a memory-mapped .npy, renamed only once complete, so a
            # failed or interrupted run leaves no incomplete <name>_prob.npy.
            partial = out_dir / f".{name}_prob.npy.partial"
            prob = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float32,
                                             shape=tuple(rgb.shape[:2]))
            try:
                _probability(segmenter, rgb, scale, out=prob, **tiling)
                prob.flush()
            except BaseException:
                del prob
                partial.unlink(missing_ok=True)
                raise
            if not overwrite and files["prob"].exists():
                partial.unlink()
                raise FileExistsError(f"{files['prob']}: already exists (use --overwrite to replace it)")
            os.replace(partial, files["prob"])
        else:
            prob = _probability(segmenter, rgb, scale, **tiling)
            files["prob"] = out_dir / f"{name}_prob.png"
            write_image(files["prob"], np.round(np.clip(prob, 0, 1) * 255).astype(np.uint8),
                        overwrite=overwrite)
        mask = prob > threshold
        if instances is not None:
            files["instances"] = write_instance_image(
                out_dir / f"{name}_instances.png", instances_from_probability(prob, threshold, **instances),
                overwrite=overwrite)
        del prob
        files["mask"] = out_dir / f"{name}_pred.png"
        write_image(files["mask"], mask.astype(np.uint8) * 255, overwrite=overwrite)
        files["overlay"] = out_dir / f"{name}_overlay.png"
        write_image(files["overlay"], overlay(rgb, mask), overwrite=overwrite)
        written.append(files)
    return written


def _probability(segmenter, rgb, scale, out=None, **tiling):
    """The probability map at ``rgb``'s size, segmented at ``scale`` of it (into ``out`` if given)."""
    if scale == 1:
        return segment_tiled(segmenter, rgb, out=out, **tiling)
    prob = resample_probability(segment_tiled(segmenter, resample_rgb(rgb, scale), **tiling), rgb.shape[:2])
    if out is None:
        return prob
    out[...] = prob
    return out
