"""The inference engines under their old path (the README names ``caffe_layers.net.inference.engines``); they
live in :mod:`caffe_layers.net.inference.engines`."""
from .inference.engines import *  # noqa: F401,F403 - the names of the module, under this path
from .inference.engines import __all__  # noqa: F401
