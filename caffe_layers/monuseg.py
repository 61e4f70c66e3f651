"""MoNuSeg 2018 tiles from the official download's layout (or a copy keeping it).

:func:`find_tiles` takes the folder holding the unpacked zips:

* training: ``MoNuSeg 2018 Training Data/`` (the official zip) or ``MoNuSegTrainingData/``,
  each with ``Tissue Images/`` (or ``Tissue_Images/``) of ``<id>.tif`` and ``Annotations/``
  of ``<id>.xml``; a training tile without its XML uses ``<training folder>/Instances/<id>.png``
  (a 16-bit instance label image) instead;
* test: ``MoNuSegTestData/`` with ``<id>.tif`` and ``<id>.xml`` side by side.

Each tile knows its organ and tissue source site (TSS, the two characters after ``TCGA-``,
the hospital that sent the slide), so a benchmark can hold out whole sites and report per
organ. Pixel size: the XML's ``MicronsPerPixel`` where it has one, else 0.25 µm/px (MoNuSeg
tiles are cut from 40× Aperio scans; the XMLs that state it say 0.2456-0.2527).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from .annotations import read_imagescope_xml, read_instance_image, xml_microns_per_pixel

__all__ = ["DEFAULT_MPP", "MonusegTile", "ORGAN_BY_SITE", "find_tiles", "tile_site"]

#: µm/px assumed for a tile whose annotation does not state it (40× scans).
DEFAULT_MPP = 0.25

TRAINING_FOLDERS = ("MoNuSeg 2018 Training Data", "MoNuSegTrainingData")
IMAGE_FOLDERS = ("Tissue Images", "Tissue_Images")
TEST_FOLDER = "MoNuSegTestData"
IMAGE_SUFFIXES = (".tif", ".tiff")
INSTANCE_SUFFIXES = (".png", ".tif", ".tiff")

#: Organ of the TCGA project of each MoNuSeg tissue source site (TSS code -> organ).
ORGAN_BY_SITE = {
    # TCGA lung projects (LUSC: 18, 21; LUAD: 38, 49, 50). Kumar et al. 2017 and the MoNuSeg
    # documentation label these six training tiles "liver"; the tissue is lung.
    "18": "lung", "21": "lung", "38": "lung", "49": "lung", "50": "lung",
    "44": "lung", "69": "lung",                                                   # LUAD (test)
    "A7": "breast", "AR": "breast", "E2": "breast", "AC": "breast", "AO": "breast",  # BRCA
    "B0": "kidney", "HE": "kidney", "2Z": "kidney", "GL": "kidney", "IZ": "kidney",  # KIRC, KIRP
    "CH": "prostate", "G9": "prostate", "EJ": "prostate", "HC": "prostate",      # PRAD
    "DK": "bladder", "G2": "bladder", "CU": "bladder", "ZF": "bladder",          # BLCA
    "AY": "colon", "NH": "colon", "A6": "colon",                                 # COAD
    "KB": "stomach", "RD": "stomach",                                            # STAD
    "FG": "brain", "HT": "brain",                                                # LGG
}


def tile_site(name):
    """Tissue source site of a TCGA tile name (``TCGA-21-5784-...`` -> ``"21"``); ``""`` if not a TCGA name."""
    return name[5:7] if name.upper().startswith("TCGA-") and len(name) >= 7 else ""


@dataclass(frozen=True)
class MonusegTile:
    """One MoNuSeg tile: its image, its annotation and where it comes from.

    Attributes
    ----------
    name : str
        The file stem, e.g. ``TCGA-21-5784-01Z-00-DX1``.
    split : {"train", "test"}
        The official split.
    image : Path
        The RGB TIFF.
    annotation : Path
        ImageScope XML (``.xml``) or instance label image (``.png``/``.tif``).
    organ : str
        From :data:`ORGAN_BY_SITE`; ``"unknown"`` for a site not in it.
    site : str
        Tissue source site (TSS).
    mpp : float or None
        µm per pixel.
    """

    name: str
    split: str
    image: Path
    annotation: Path
    organ: str
    site: str
    mpp: Optional[float]

    def load(self):
        """Read the tile.

        Returns
        -------
        rgb : (H, W, 3) uint8 ndarray
        labels : (H, W) int32 ndarray
            Instance labels (0 background), from the XML (:func:`read_imagescope_xml`) or the
            instance image (:func:`read_instance_image`), checked against the image's size.
        """
        from .image_io import read_rgb

        rgb = read_rgb(self.image)
        if self.annotation.suffix.lower() == ".xml":
            labels = read_imagescope_xml(self.annotation, rgb.shape[:2])
        else:
            labels = read_instance_image(self.annotation, shape=rgb.shape[:2])
        return rgb, labels


def _files(folder, suffixes):
    """``{stem: path}`` of the files in ``folder`` with one of ``suffixes`` (case-insensitive)."""
    if folder is None or not folder.is_dir():
        return {}
    return {p.stem: p for p in sorted(folder.iterdir()) if p.is_file() and p.suffix.lower() in suffixes}


def _one_of(root, names, what):
    found = [root / name for name in names if (root / name).is_dir()]
    if len(found) > 1:
        raise ValueError(f"MoNuSeg folder {str(root)!r} holds both {found[0].name!r} and {found[1].name!r} "
                         f"as {what}; keep one")
    return found[0] if found else None


def _tile(name, split, image, annotation):
    site = tile_site(name)
    mpp = xml_microns_per_pixel(annotation) if annotation.suffix.lower() == ".xml" else None
    return MonusegTile(name=name, split=split, image=image, annotation=annotation,
                       organ=ORGAN_BY_SITE.get(site.upper(), "unknown"), site=site,
                       mpp=DEFAULT_MPP if mpp is None else mpp)


def _training_tiles(root):
    top = _one_of(root, TRAINING_FOLDERS, "training folder")
    if top is None:
        return []
    images = _files(_one_of(top, IMAGE_FOLDERS, "training image folder"), IMAGE_SUFFIXES)
    xmls = _files(top / "Annotations", (".xml",))
    instances = _files(top / "Instances", INSTANCE_SUFFIXES)
    tiles = []
    for name, image in images.items():
        annotation = xmls.get(name) or instances.get(name)
        if annotation is None:
            raise ValueError(f"MoNuSeg training tile {name!r} ({str(image)!r}) has neither "
                             f"Annotations/{name}.xml nor Instances/{name}.png in {str(top)!r}")
        tiles.append(_tile(name, "train", image, annotation))
    return tiles


def _test_tiles(root):
    folder = root / TEST_FOLDER
    xmls = _files(folder, (".xml",))
    tiles = []
    for name, image in _files(folder, IMAGE_SUFFIXES).items():
        if name not in xmls:
            raise ValueError(f"MoNuSeg test tile {name!r} ({str(image)!r}) has no {name}.xml beside it")
        tiles.append(_tile(name, "test", image, xmls[name]))
    return tiles


def find_tiles(root):
    """Every MoNuSeg tile under ``root`` (see the module docstring for the layouts).

    Parameters
    ----------
    root : str or path-like
        The folder holding the training and/or test folder.

    Returns
    -------
    list of MonusegTile
        Sorted by name (training and test together).

    Raises
    ------
    FileNotFoundError
        If ``root`` is not a folder or holds no MoNuSeg tile.
    ValueError
        If a tile has no annotation (the message names it), or ``root`` holds two training
        layouts at once.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"MoNuSeg folder {str(root)!r} does not exist (or is not a folder)")
    tiles = sorted(_training_tiles(root) + _test_tiles(root), key=lambda tile: tile.name)
    if not tiles:
        raise FileNotFoundError(
            f"MoNuSeg folder {str(root)!r} holds no tiles; expected {TRAINING_FOLDERS[0]!r} or "
            f"{TRAINING_FOLDERS[1]!r} (with 'Tissue Images/' and 'Annotations/') and/or {TEST_FOLDER!r}")
    return tiles
