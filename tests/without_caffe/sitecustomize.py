"""Put this folder first on PYTHONPATH and ``import caffe`` fails, as on a machine without pycaffe
(Python imports ``sitecustomize`` at start-up). Tests run the commands and the OpenCV engine this
way beside the pycaffe of .venv, in one test run."""
import sys


class _NoCaffe:
    """A meta-path finder that refuses ``caffe`` and its submodules."""

    def find_spec(self, name, path=None, target=None):
        if name == "caffe" or name.startswith("caffe."):
            raise ModuleNotFoundError("No module named 'caffe'", name=name)
        return None


sys.meta_path.insert(0, _NoCaffe())
