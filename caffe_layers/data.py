"""Caffe Python layer: random patches from image/mask files, optionally augmented.

Replaces an LMDB/HDF5 data layer for nuclei segmentation; put it at the bottom of a train
prototxt::

    layer {
      name: "data" type: "Python"
      top: "data" top: "label"
      python_param {
        module: "caffe_layers.data"  layer: "PatchDataLayer"
        param_str: '{"source": "train.txt", "batch_size": 8, "patch_size": 128, "seed": 1,
                     "augment": {"rotate": true, "flip": true, "hed": true}}'
      }
    }

``source`` lists one ``image mask`` pair per line (relative paths are resolved against
``root``, by default the list file's directory). Tops: ``data`` N×3×P×P float32 RGB in 0-255
and, optionally, ``label`` N×1×P×P float32 {0, 1}. Every file is read once, at setup, so
missing files, size mismatches and patches larger than an image fail ``caffe.Net(...)``
straight away rather than mid-training. Keys: ``PATCH_DATA_SCHEMA.describe()``; sampling:
:class:`caffe_layers.patches.PatchSampler`.

``augment`` (a dict of :data:`~caffe_layers.params.AUGMENT_SCHEMA` keys) is applied in the
TRAIN phase, and in TEST only when ``augment.test_augment`` is true. With a layer ``seed``
and no ``augment.seed``, the augmenter's seed is derived from the layer's, so one seed makes
the whole layer reproducible (``caffe.set_random_seed`` does not reach numpy).
"""
import os

import caffe

from .layer_api import layer_param_str, layer_phase
from .patches import PATCH_DATA_SCHEMA
from .schema import load_params
from .patches import PatchSampler, derived_seed, load_pairs, read_pair_list
from .transforms import BatchAugmenter


class PatchDataLayer(caffe.Layer):
    """No bottoms; tops: data (N×3×P×P) [, label (N×1×P×P)]."""

    WHERE = "PatchDataLayer param_str"

    def setup(self, bottom, top):
        self.params = params = load_params(layer_param_str(self, "PatchDataLayer"), PATCH_DATA_SCHEMA, self.WHERE)
        if len(bottom) != 0:
            raise ValueError(f"PatchDataLayer takes no bottoms, got {len(bottom)}")
        if len(top) not in (1, 2):
            raise ValueError(f"PatchDataLayer needs 1 or 2 tops (data[, label]), got {len(top)}")

        source = params["source"]
        if not os.path.isfile(source):
            raise FileNotFoundError(f"PatchDataLayer: list file {source!r} ('source' in "
                                    f"{self.WHERE}) does not exist (working directory: "
                                    f"{os.getcwd()!r})")
        self.pairs = read_pair_list(source, params["root"])
        images, masks = load_pairs(self.pairs)
        self.sampler = PatchSampler(images, masks, params["patch_size"], params["batch_size"],
                                    shuffle=params["shuffle"], seed=params["seed"],
                                    names=[image for image, _ in self.pairs])

        self.augmenter = None
        augment = params["augment"]
        if augment is not None and (layer_phase(self, "PatchDataLayer") == caffe.TRAIN or augment["test_augment"]):
            augment = dict(augment)
            if augment["seed"] is None:
                augment["seed"] = derived_seed(params["seed"], 1)
            self.augmenter = BatchAugmenter(where=self.WHERE + " 'augment'", **augment)
        self.reshape(bottom, top)

    def reshape(self, bottom, top):
        N, P = self.params["batch_size"], self.params["patch_size"]
        top[0].reshape(N, 3, P, P)
        if len(top) == 2:
            top[1].reshape(N, 1, P, P)

    def forward(self, bottom, top):
        data, label = self.sampler.next_batch()
        has_label = len(top) == 2
        if self.augmenter is None:
            top[0].data[...] = data
            if has_label:
                top[1].data[...] = label
        else:
            # Straight into the blobs: no extra batch-sized copy.
            self.augmenter.augment_into(data, label if has_label else None,
                                        top[0].data, top[1].data if has_label else None)

    def backward(self, top, propagate_down, bottom):
        pass  # a data layer: nothing below it
