"""caffe-stain-augment: stain-robust training for Caffe nuclei segmenters.

The metadata and dependencies are in ``pyproject.toml``; this file holds only what
pyproject.toml cannot express:

* the console scripts, one per module of ``caffe_layers/cli`` (the tuple below is the one list);
* the packages: every ``caffe_layers`` package, plus the generated templates of the repository's
  top-level ``prototxt/`` shipped as package data under ``caffe_layers/prototxt/``
  (``caffe_layers.template_dir()`` finds them in a wheel and in a source checkout).

Caffe itself is not on PyPI in a usable form: ``scripts/install_caffe.sh`` builds it and
installs this package into ``.venv`` with ``pip install -e .[test,scripts]``.
"""
from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["caffe_layers", "caffe_layers.*"]) + ["caffe_layers.prototxt"],
    package_dir={"caffe_layers.prototxt": "prototxt"},
    package_data={"caffe_layers.prototxt": ["*.prototxt"]},
    entry_points={
        # One module per command under caffe_layers/cli/, each with main(argv=None).
        "console_scripts": [
            f"caffe-stain-{command} = caffe_layers.cli.{command}:main"
            for command in ("experiment", "prepare", "train", "segment", "compare", "meanfile", "normalize",
                            "estimate", "lmdb", "retrofit", "export")
        ],
    },
)
