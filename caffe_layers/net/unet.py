"""The U-Net template generator under its old path (the README names ``caffe_layers.net.training.templates``);
it lives in :mod:`caffe_layers.net.training.templates`."""
from .training.templates import *  # noqa: F401,F403 - the names of the module, under this path
from .training.templates import __all__  # noqa: F401
