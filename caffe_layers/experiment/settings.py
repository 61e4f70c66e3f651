"""What decides an experiment run's numbers: the settings, the presets and the model design."""
import dataclasses

from ..tiling import DEFAULT_OVERLAP, DEFAULT_THRESHOLD, DEFAULT_TILE

__all__ = ["AUGMENTED_AND_NORMALISED", "BASELINE", "HISTMATCH", "INPUT_CONVENTION", "MODELS", "PRESETS", "TTA_MODELS", "Settings"]

#: (name, centring, augmentation recipe or None). Recipes: "range" -- the colour and stain range
#: estimated from the stain-shifted validation band, widened to the most extreme shift;
#: "percentile" -- the same estimate covering the 5-95 % of the shifts; "stain_stats" -- per-sample
#: target statistics drawn from their distribution over the training and shifted validation bands.
MODELS = (
    ("meanfile", "meanfile", None),
    ("meanfile+aug", "meanfile", "range"),
    ("patchmean", "patchmean", None),
    ("patchmean+aug", "patchmean", "range"),
    ("patchmean+aug-p5-95", "patchmean", "percentile"),
    ("patchmean+stainstats", "patchmean", "stain_stats"),
)
BASELINE = "meanfile"
HISTMATCH = "meanfile+histmatch"  # the baseline on histogram-matched input (rows "meanfile+<normaliser>")
# Models also scored with test-time augmentation (8 rotations/flips averaged): rows "<model>+tta".
# The baseline only: TTA is a test-time alternative to training with the layer (on the augmented
# model it changed no Dice by more than 0.003 in a full run, at 8x the scoring time).
TTA_MODELS = ("meanfile",)
#: Augmented models also scored on Macenko-normalised input: rows "<model>+macenko".
AUGMENTED_AND_NORMALISED = ("patchmean+aug", "patchmean+stainstats")
INPUT_CONVENTION = {"blob": "data", "layout": "N×3×H×W float32", "channel_order": "RGB",
                    "value_range": [0, 255], "output": "prob: N×2×H×W softmax, channel 1 = nucleus",
                    "size_multiple": None}


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything that decides a run's numbers (recorded in ``summary.json``)."""

    seed: int = 0
    patch_size: int = 64
    batch_size: int = 8
    depth: int = 2
    base_width: int = 16
    base_iters: int = 400
    finetune_iters: int = 200
    base_lr: float = 1e-3
    finetune_lr: float = 5e-4
    validate_every: int = 100
    val_batches: int = 8
    color_margin: float = 0.1
    percentiles: tuple = (5.0, 95.0)  # of the observed shifts, for the "percentile" recipe
    stain_space: str = "lab"  # the "stain_stats" recipe's colour space
    stain_spread: float = 1.0  # its spread multiplier
    hed_jitter: bool = True  # add stain-space jitter with the estimated range to the augmentation
    tile: int = DEFAULT_TILE
    overlap: int = DEFAULT_OVERLAP  # wider than the U-Net's receptive field (~47 px): tiles agree with one pass
    threshold: float = DEFAULT_THRESHOLD
    tta: bool = True  # add the TTA_MODELS rows
    leave_one_out: bool = False  # also test each synthetic shift on a model whose range never saw it
    batch_tiles: int = 4  # tiles per forward pass
    crop: int = 0  # >0: use only the top-left crop×crop of the slide (for tiny runs)
    example_size: int = 512  # side of the centre crop of each real differently stained image
    engine: str = "auto"  # inference engine of the scoring: caffe, opencv or auto (caffe_layers.net.engines)


PRESETS = {
    "quick": Settings(),
    "long": Settings(base_iters=3000, finetune_iters=1500, patch_size=96, leave_one_out=True),
    "tiny": Settings(patch_size=32, batch_size=2, base_width=4, base_iters=6, finetune_iters=4,
                     validate_every=3, val_batches=1, tile=64, overlap=16, crop=320, example_size=64),
}
