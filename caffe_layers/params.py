"""Layer and tool parameters, under their long-standing import path.

The pieces live beside what they serve; this module re-exports every name it has always had, so
``from caffe_layers.params import AUGMENT_SCHEMA, load_params`` keeps working:

* :mod:`caffe_layers.param_str` -- the safe ``param_str`` reader (JSON, Python literal, YAML;
  never ``eval``) and writer: :func:`parse_param_str`, :func:`format_param_str`, :class:`ParamError`;
* :mod:`caffe_layers.schema` -- declared keys: :class:`Param`, :class:`Schema`, :func:`load_params`;
* the schemas: :data:`AUGMENT_SCHEMA` (:mod:`caffe_layers.transforms.schema`),
  :data:`PATCH_DATA_SCHEMA` and :data:`MEAN_SUBTRACT_SCHEMA` (:mod:`caffe_layers.patches`),
  :data:`MODEL_CARD_SCHEMA` (:mod:`caffe_layers.model_card`).

Examples
--------
>>> params = load_params('{"rotate": True, "color": True, "color_a_min": .3}',
...                      AUGMENT_SCHEMA, where="AugmentationLayer param_str")
>>> params["rotate"], params["color_a_min"], params["color_a_max"]
(True, 0.3, 1.1)
"""
from . import param_str, schema
from .model_card import MODEL_CARD_SCHEMA
from .param_str import (ACCEPTED_FORMATS, MAX_PARAM_DEPTH, MAX_PARAM_STR_CHARS, ParamError, format_param_str,
                        parse_param_str)
from .patches import MEAN_SUBTRACT_SCHEMA, PATCH_DATA_SCHEMA
from .schema import (FLOAT32_MAX, FLOAT32_TINY, INT64_MAX, INT64_MIN, INT_MAX, MAX_FLOATS_ITEMS, REQUIRED, Param,
                     Schema, load_params)
from .transforms.schema import AUGMENT_SCHEMA

# Every public name of the parser and the schema machinery, and the four schemas.
__all__ = sorted(param_str.__all__ + schema.__all__
                 + ["AUGMENT_SCHEMA", "MEAN_SUBTRACT_SCHEMA", "MODEL_CARD_SCHEMA", "PATCH_DATA_SCHEMA"])
