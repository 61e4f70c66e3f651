"""What the Caffe Python layers need from pycaffe, read with a message that says so.

The layers use only what every pycaffe since BVLC Caffe 1.0 gives a Python layer: the
``caffe.Layer`` base class and two attributes that Caffe's ``PythonLayer::LayerSetUp`` sets on
the layer object just before calling its ``setup()``:

* ``param_str`` -- ``python_param { param_str: ... }`` of the prototxt, as a string;
* ``phase`` -- the net's phase, ``caffe.TRAIN`` (0) or ``caffe.TEST`` (1).

Older pycaffe versions and some forks set neither or only one (an old name was ``param_str_``).
Reading a missing one would fail deep in ``caffe.Net(...)`` with a bare ``AttributeError``;
these helpers raise :class:`PycaffeMismatch` naming the layer, the attribute and what Caffe
is needed instead. No Caffe import here: the helpers work on any object.
"""

__all__ = ["PycaffeMismatch", "REQUIREMENT", "layer_param_str", "layer_phase"]

#: What the layers need, as the error messages say it.
REQUIREMENT = ("pycaffe from BVLC Caffe 1.0 or later, or a fork that keeps its Python layer "
               "interface (caffe.Layer with param_str and phase set before setup())")


class PycaffeMismatch(RuntimeError):
    """The running pycaffe does not give Python layers what BVLC Caffe 1.0 does."""


def layer_param_str(layer, name):
    """``layer.param_str`` (the prototxt's ``python_param.param_str``); ``name`` names the layer
    class in the error."""
    try:
        return layer.param_str
    except AttributeError:
        older = " (it sets param_str_, an older name of it)" if hasattr(layer, "param_str_") else ""
        raise PycaffeMismatch(
            f"{name} reads its settings from the 'param_str' attribute that Caffe sets on a Python "
            f"layer before setup(), and this Caffe did not set it{older}. {name} needs "
            f"{REQUIREMENT}.") from None


def layer_phase(layer, name):
    """``layer.phase`` (0 = TRAIN, 1 = TEST, comparable with ``caffe.TRAIN``); ``name`` names the
    layer class in the error."""
    try:
        phase = layer.phase
    except AttributeError:
        raise PycaffeMismatch(
            f"{name} needs the 'phase' attribute (TRAIN or TEST) that Caffe sets on a Python layer "
            f"before setup(), to augment only while training, and this Caffe did not set it. "
            f"{name} needs {REQUIREMENT}.") from None
    if phase not in (0, 1):
        raise PycaffeMismatch(f"{name}: Caffe set phase={phase!r} on the layer; expected TRAIN (0) or "
                              f"TEST (1) as BVLC Caffe 1.0 does. {name} needs {REQUIREMENT}.")
    return phase
