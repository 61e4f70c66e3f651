"""A small U-Net trained on real MoNuSeg tiles and exported as the benchmark exports its models
(deploy, weights, model card with ``mpp: 0.5``), for the tests that run the commands on real H&E.

``monuseg_model`` trains it once per test module (a few seconds of Caffe); the MoNuSeg copy is
read from the repository's ``../shared/data/monuseg`` (or CAFFE_STAIN_MONUSEG).
"""
import dataclasses
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
MONUSEG = Path(os.environ.get("CAFFE_STAIN_MONUSEG", REPO_ROOT.parent / "shared" / "data" / "monuseg"))
#: Test tiles of two organs (breast, lung): segmented and scored, never trained on.
TEST_TILES = ("TCGA-2Z-A9J9-01A-01-TS1", "TCGA-44-2665-01B-06-BS6")
TRAIN_ITERS = 20


def monuseg_root():
    if not (MONUSEG / "MoNuSegTestData").is_dir():
        message = f"the MoNuSeg copy is not at {MONUSEG} (set CAFFE_STAIN_MONUSEG)"
        if os.environ.get("CAFFE_STAIN_REQUIRE_DATA"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return MONUSEG


def monuseg_test_tile(name):
    """(image .tif, annotation .xml) of a MoNuSeg test tile."""
    folder = monuseg_root() / "MoNuSegTestData"
    return folder / f"{name}.tif", folder / f"{name}.xml"


@dataclasses.dataclass(frozen=True)
class ExportedModel:
    deploy: Path
    weights: Path
    card: Path
    mpp: float


@pytest.fixture(scope="module")
def monuseg_model(caffe, tmp_path_factory):
    """The patch-centred U-Net (depth 2, width 8) trained TRAIN_ITERS iterations at 0.5 µm/px on one
    MoNuSeg training tile, exported with its card."""
    from caffe_layers.experiment.monuseg_data import prepare_monuseg
    from caffe_layers.experiment.settings import Settings
    from caffe_layers.experiment.trainings import export_model, train_model

    root = monuseg_root()
    folder = tmp_path_factory.mktemp("monuseg_model")
    settings = Settings(patch_size=64, batch_size=4, base_width=8, depth=2, validate_every=TRAIN_ITERS, val_batches=1,
                        tile=256, seed=0)
    data = prepare_monuseg(root, folder / "data", mpp=0.5, val_sites=("21",), patch_size=settings.patch_size,
                           limit=1)
    weights, _ = train_model("patchmean", "patchmean", None, data.lists, None, settings, folder / "train",
                             iters=TRAIN_ITERS, lr=1e-2)
    deploy, weights, _, card = export_model("patchmean", "patchmean", weights, None, settings, folder, mpp=0.5)
    return ExportedModel(deploy, weights, card, 0.5)
