"""The packaged H&E sample data under its old path (``caffe_layers.datasets``); it lives in
:mod:`caffe_layers.sample_data`."""
from .sample_data import *  # noqa: F401,F403 - the names of the module, under this path
from .sample_data import __all__  # noqa: F401
