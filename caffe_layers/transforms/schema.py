"""The keys of the augmentation: :data:`AUGMENT_SCHEMA`, read by :class:`~caffe_layers.transforms.BatchAugmenter`,
the augmentation layer (:mod:`caffe_layers.augmentation`) and the patch data layer's ``augment`` entry.

``python -c "from caffe_layers.params import AUGMENT_SCHEMA; print(AUGMENT_SCHEMA.describe())"``
prints them as a table.
"""
from ..schema import INT64_MAX, Param, Schema
from ..stain.statistics import STAIN_STATS_SCHEMA

__all__ = ["AUGMENT_SCHEMA"]


def _probability(name: str, doc: str, default: float = 1.0) -> Param:
    return Param(name, "float", default, min=0.0, max=1.0, doc=doc)


AUGMENT_SCHEMA = Schema(
    [
        Param("rotate", "bool", False, doc="random multiple of 90 degrees per sample (0/180 only for non-square patches)"),
        Param("flip", "bool", False, doc="random horizontal and vertical flips per sample"),
        Param("rotate_any", "bool", False, doc="arbitrary-angle rotation about the centre, reflect padding"),
        Param("angle_min", "float", -180.0, min=-360.0, max=360.0, doc="lowest rotate_any angle, degrees"),
        Param("angle_max", "float", 180.0, min=-360.0, max=360.0, doc="highest rotate_any angle, degrees"),
        Param("color", "bool", False, doc="per-sample, per-channel x*a + b"),
        Param("color_a_min", "float", 0.9, min=0.0, min_inclusive=False, doc="lowest contrast factor a"),
        Param("color_a_max", "float", 1.1, min=0.0, min_inclusive=False, doc="highest contrast factor a"),
        Param("color_b_min", "float", -10.0, doc="lowest brightness offset b, in input intensity units"),
        Param("color_b_max", "float", 10.0, doc="highest brightness offset b, in input intensity units"),
        _probability("color_p", "probability that a sample gets the colour change"),
        Param("clip", "bool", True, doc="clip to [clip_min, clip_max] after the colour change"),
        Param("clip_min", "float", 0.0, doc="lower clip bound"),
        Param("clip_max", "float", 255.0, doc="upper clip bound"),
        Param("hed", "bool", False, doc="stain-space (haematoxylin/eosin/DAB) jitter, Tellez et al."),
        Param("hed_alpha", "float", 0.05, min=0.0, max=1.0, max_inclusive=False,
              doc="stain scale alpha ~ U[1-hed_alpha, 1+hed_alpha] per sample and stain"),
        Param("hed_beta", "float", 0.01, min=0.0, doc="stain shift beta ~ U[-hed_beta, hed_beta] per sample and stain"),
        _probability("hed_p", "probability that a sample gets the stain jitter"),
        Param("stain_angle", "float", 0.0, min=0.0, max=30.0,
              doc="hue jitter with hed: turn the H and E optical-density vectors by U[-stain_angle, "
                  "stain_angle] degrees each, per sample, in their plane (0: off)"),
        Param("max_value", "float", 255.0, min=0.0, min_inclusive=False,
              doc="intensity of white in the input (optical density reference for hed)"),
        Param("channel_order", "str", "RGB", choices=("RGB", "BGR"),
              doc="channel order of the input images (hed needs to know which channel is red)"),
        Param("seed", "int", None, optional=True, min=0, max=INT64_MAX,
              doc="random seed for numpy.random.default_rng, 0 to 2**63-1; None draws fresh entropy"),
        Param("test_augment", "bool", False, doc="also augment in the TEST phase"),
        _probability("p", "probability that a sample gets the colour part at all (stain_stats, hed, color); "
                          "geometry is drawn for every sample"),
    ],
    ordered_pairs=[
        ("angle_min", "angle_max"),
        ("color_a_min", "color_a_max"),
        ("color_b_min", "color_b_max"),
        ("clip_min", "clip_max"),
    ],
    # stain_stats: target tissue statistics drawn per sample (caffe-stain-estimate --fit-stats writes it).
    nested={"stain_stats": STAIN_STATS_SCHEMA},
    name="augment",
)
"""Parameters of the augmentation layer and :class:`~caffe_layers.transforms.BatchAugmenter`."""
