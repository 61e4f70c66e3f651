"""Retrofit a user's train_val net with the AugmentationLayer (pure ``caffe_pb2`` manipulation).

:func:`retrofit` takes a ``NetParameter`` (V0/V1 nets are upgraded first, the way Caffe's
``upgrade_proto.cpp`` does it, see :func:`~caffe_layers.net.prototxt.upgrade_net`) and returns a rewritten copy:

1. The TRAIN-phase data layer(s) and their image and label tops are found: ``Data``
   (LMDB/LevelDB, one layer with data + label tops or one layer per top as DIGITS
   segmentation datasets have), ``ImageData``, ``WindowData``, ``HDF5Data``, ``Input``,
   ``DummyData`` or a Python layer without bottoms (any module). Databases are never opened:
   everything is decided from the prototxt.
2. An ``AugmentationLayer`` (``module: "caffe_layers.augmentation"``) is inserted right after
   them, ``include { phase: TRAIN }``, *in place* (``bottom: "data" top: "data"``), so every
   consumer reads the same blob name in TRAIN (augmented) and in TEST (where the layer is
   absent). A label that is a per-pixel map goes through it too; a class label is left alone.
   An existing augmentation layer (a Python layer whose ``layer`` name contains "Augment",
   e.g. DIGITS' ``digits_python_layers``) is replaced and its ``param_str`` carried over.
3. What ``transform_param`` does after its mean moves after the augmentation, because the
   augmentation must see raw stain intensities: ``mean_file`` becomes a
   :class:`~caffe_layers.mean_subtract.MeanSubtractLayer`, ``mean_value`` a ``Power``
   (``shift: -m``, one value) or a ``Bias`` layer with fixed blobs (one value per channel,
   ``lr_mult: 0``), ``scale`` a ``Power`` (``scale: s``), in both phases. These layers compute
   ``(x - mean) * scale`` with the same float32 operations as Caffe's ``DataTransformer``, so
   the TEST-phase output is unchanged. With ``centring="patchmean"`` the mean is replaced by
   per-patch ``MVN`` centring (``normalize_variance: false``), in the deploy net as well.
   ``mirror`` and ``crop_size`` stay in the data layer.

Caffe's ``Data``, ``ImageData`` and ``WindowData`` layers deliver BGR images (OpenCV,
``convert_imageset``, DIGITS) in 0-255: with ``hed`` on and no ``channel_order`` given, the
layer is told ``channel_order: "BGR"``. Data that is not 0-255 (HDF5 in 0-1, say) cannot be
recognised from a prototxt: ``input_range=1`` converts the param_str's intensity values
(``color_b_*``, ``clip_*``, ``max_value``, given in 0-255 grey levels as
``caffe-stain-estimate`` prints them) to 0-1.

Every refusal is a ``ValueError`` naming the layer or top; the returned
:class:`RetrofitResult` lists what changed, layer by layer. :func:`retrofit_files` reads and
writes prototxt files (atomically, never over its inputs).

The steps live in :mod:`~caffe_layers.net.retrofit.inputs` (what the net feeds),
:mod:`~caffe_layers.net.retrofit.augment_params` (the param_str), :mod:`~caffe_layers.net.retrofit.layers`
(the inserted layers), :mod:`~caffe_layers.net.retrofit.rewrite` (:func:`retrofit`) and
:mod:`~caffe_layers.net.retrofit.files`.
"""
from .augment_params import read_param_str_source
from .files import retrofit_files
from .inputs import LABEL_KINDS
from .layers import AUGMENTATION_LAYER, AUGMENTATION_MODULE
from .rewrite import CENTRINGS, INPUT_RANGES, RetrofitResult, retrofit

__all__ = [
    "AUGMENTATION_LAYER",
    "AUGMENTATION_MODULE",
    "CENTRINGS",
    "INPUT_RANGES",
    "LABEL_KINDS",
    "RetrofitResult",
    "read_param_str_source",
    "retrofit",
    "retrofit_files",
]
