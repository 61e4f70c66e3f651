"""The stain-robustness experiment, end to end on real packaged H&E (the README's main job).

* :mod:`~caffe_layers.experiment.settings` -- settings, presets and the 2 × 2 model design;
* :mod:`~caffe_layers.experiment.regions` -- the train / validation / test bands on disk;
* :mod:`~caffe_layers.experiment.run` -- :func:`run_experiment`.

Run it with ``bash scripts/run_experiment.sh`` (or ``caffe-stain-experiment``).
"""
from .run import run_experiment
from .settings import BASELINE, HISTMATCH, MODELS, PRESETS, Settings

__all__ = ["BASELINE", "HISTMATCH", "MODELS", "PRESETS", "Settings", "run_experiment"]
