"""Caffe Python layer: random rotation, flips and colour (stain) augmentation.

Drop it into a train prototxt right after the data layer::

    layer {
      name: "augment" type: "Python"
      bottom: "data" bottom: "label" top: "data" top: "label"
      python_param {
        module: "caffe_layers.augmentation"  layer: "AugmentationLayer"
        param_str: '{"rotate": True, "color": True, "color_a_max":1.5, "color_a_min": .3}'
      }
    }

``param_str`` may be JSON, YAML or a Python-literal dict; its keys are listed by
``caffe_layers.params.AUGMENT_SCHEMA.describe()``. The colour change is ``a*x + b`` per sample
and channel on the blob *as it arrives*: for 0-255 input, ``b`` is in grey levels; if the data
was scaled (e.g. by 1/255) scale ``b`` (and ``clip_max``) the same way; if it was already
mean-subtracted, ``a`` also scales the mean, so put this layer before any centring.

With ``stain_stats`` (the ``--json`` output of ``caffe-stain-estimate --fit-stats``, see
docs/stain-statistics.md) each sample's tissue colour statistics are moved to ones drawn from
those of the fitted images; ``p`` is the probability that a sample gets the colour part at all.

The layer augments in the TRAIN phase and is the identity in TEST unless ``test_augment`` is
true. It has no backward: it sits on data.
"""
import caffe

from .layer_api import layer_param_str, layer_phase
from .schema import load_params
from .transforms.schema import AUGMENT_SCHEMA
from .transforms import BatchAugmenter
from .transforms.functional import check_batch


class AugmentationLayer(caffe.Layer):
    """Bottoms: image (N×C×H×W) [, label (N×1×H×W or N×H×W)]; the same number of tops."""

    def setup(self, bottom, top):
        where = "AugmentationLayer param_str"
        self.params = load_params(layer_param_str(self, "AugmentationLayer"), AUGMENT_SCHEMA, where)
        if len(bottom) not in (1, 2):
            raise ValueError(f"AugmentationLayer takes 1 or 2 bottoms (image[, label]), got {len(bottom)}")
        if len(top) != len(bottom):
            raise ValueError(f"AugmentationLayer needs as many tops as bottoms: {len(bottom)} bottoms, "
                             f"{len(top)} tops")
        self._check_shapes(bottom)
        self.active = layer_phase(self, "AugmentationLayer") == caffe.TRAIN or self.params["test_augment"]
        self.augmenter = BatchAugmenter(where=where, **self.params)

    def _check_shapes(self, bottom):
        # The core's checks, named for the layer: they run at setup and on every reshape.
        for i in range(len(bottom)):
            # An empty blob has no memory: touching .data would abort Caffe (CHECK data_).
            if bottom[i].count == 0:
                raise ValueError(f"AugmentationLayer: bottom {i} is empty (shape {tuple(bottom[i].shape)}); "
                                 "a batch needs at least one sample")
        labels = bottom[1].data if len(bottom) == 2 else None
        try:
            check_batch(bottom[0].data, labels,
                        need_rgb=bool(self.params["hed"]) or self.params["stain_stats"] is not None)
        except (TypeError, ValueError) as error:
            raise ValueError(f"AugmentationLayer (bottoms image[, label]): {error}") from None

    def reshape(self, bottom, top):
        self._check_shapes(bottom)
        for i in range(len(bottom)):
            top[i].reshape(*bottom[i].data.shape)

    def forward(self, bottom, top):
        n_blobs = len(bottom)
        if not self.active:
            for i in range(n_blobs):
                top[i].data[...] = bottom[i].data
            return
        # Written straight into the tops (which may be the bottoms): no extra batch copies.
        two = n_blobs == 2
        self.augmenter.augment_into(bottom[0].data, bottom[1].data if two else None,
                                    top[0].data, top[1].data if two else None)

    def backward(self, top, propagate_down, bottom):
        pass  # a data-side layer: nothing below it learns
