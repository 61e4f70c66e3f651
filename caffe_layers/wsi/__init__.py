"""Whole-slide images: readers, tissue-skipping block plans, resumable runs and pyramidal outputs (no Caffe).

The net-dependent part -- one predictor per worker process -- is
:mod:`caffe_layers.net.inference.slides`; ``caffe-stain-segment`` uses both for slide inputs.
"""
from .outputs import iter_nuclei, write_geojson, write_pyramid
from .pipeline import (DEFAULT_BLOCK, DaskExecutor, LocalExecutor, SlideSettings, compute_block, find_slides,
                       plan_slide, run_slides, slide_outputs)
from .reader import choose_level, is_slide, open_slide

__all__ = ["DEFAULT_BLOCK", "DaskExecutor", "LocalExecutor", "SlideSettings", "choose_level", "compute_block",
           "find_slides", "is_slide", "iter_nuclei", "open_slide", "plan_slide", "run_slides", "slide_outputs",
           "write_geojson", "write_pyramid"]
