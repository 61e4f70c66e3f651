"""caffe-stain-augment: stain-robust training for Caffe nuclei segmenters.

Caffe itself is not on PyPI in a usable form: ``scripts/install_caffe.sh`` builds it and
installs this package into ``.venv`` with ``pip install -e .[test,scripts]``.
"""
from setuptools import find_packages, setup

setup(
    name="caffe-stain-augment",
    version="0.1.0",
    description="Stain augmentation layer, stain tools and U-Net templates for Caffe",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.11,<3.12",
    packages=find_packages(include=["caffe_layers", "caffe_layers.*"]),
    install_requires=[
        "numpy>=1.24,<3",
        "scipy>=1.10",
        "pyyaml>=6",
        "pillow>=10",  # image reading in the data layer
        "tifffile>=2023.1",
    ],
    extras_require={
        "scripts": [
            "scikit-image>=0.22",
            "tqdm>=4.60",
            "matplotlib>=3.7",
            "tifffile>=2023.1",
            "imagecodecs>=2023.1",
            "pillow>=10",
            "protobuf>=3.20",
            "six",
        ],
        "test": [
            "pytest>=7",
            "hypothesis>=6.80",
            "scikit-image>=0.22",
            "tqdm>=4.60",
            "matplotlib>=3.7",
            "tifffile>=2023.1",
            "imagecodecs>=2023.1",
            "pillow>=10",
            "protobuf>=3.20",
            "six",
        ],
    },
    entry_points={
        "console_scripts": [
            "caffe-stain-experiment = caffe_layers.experiment:main",
            "caffe-stain-train = caffe_layers.training:main",
            "caffe-stain-segment = caffe_layers.segment:segment_main",
            "caffe-stain-compare = caffe_layers.compare:compare_main",
            "caffe-stain-meanfile = caffe_layers.meanfile:main",
            "caffe-stain-normalize = caffe_layers.stain_cli:normalize_main",
            "caffe-stain-estimate = caffe_layers.stain_cli:estimate_main",
        ],
    },
    classifiers=[
        "Programming Language :: Python :: 3.11",
        "Topic :: Scientific/Engineering :: Image Processing",
    ],
)
