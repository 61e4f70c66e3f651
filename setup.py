"""caffe-stain-augment: stain-robust training for Caffe nuclei segmenters.

Caffe itself is not on PyPI in a usable form: ``scripts/install_caffe.sh`` builds it and
installs this package into ``.venv`` with ``pip install -e .[test,scripts]``.
"""
from pathlib import Path

from setuptools import find_packages, setup

# The command-line tools, benchmarks and experiment (pycaffe's own Python needs
# protobuf, scikit-image and six).
SCRIPT_REQUIRES = [
    "tqdm>=4.60",
    "matplotlib>=3.7",
    "imagecodecs>=2023.1",
    "protobuf>=3.20",
    "six",
    "lmdb>=1.4",  # writes the Datum LMDBs of caffe-stain-lmdb (Caffe itself reads them)
]
README = Path(__file__).with_name("README.md")

setup(
    name="caffe-stain-augment",
    version="0.1.0",
    description="Stain augmentation layer, stain tools and U-Net templates for Caffe",
    long_description=README.read_text(encoding="utf-8") if README.exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.11,<3.12",
    packages=find_packages(include=["caffe_layers", "caffe_layers.*"]),
    install_requires=[
        "numpy>=1.24,<3",
        "scipy>=1.10",
        "pyyaml>=6",
        "scikit-image>=0.22",  # stain matrices, colour spaces
        # SIMD flips and quarter turns in the augmentation core; the OpenCV inference engine needs
        # cv2.dnn.readNetFromCaffe, which OpenCV 5 removed.
        "opencv-python-headless>=4.9,<5",
        "pillow>=10",  # image reading in the data layer
        "tifffile>=2023.1",
    ],
    extras_require={
        "scripts": SCRIPT_REQUIRES,
        # lmdb and plyvel write the LMDB / LevelDB databases the Caffe build's tests read back.
        "test": SCRIPT_REQUIRES + ["pytest>=7", "hypothesis>=6.80", "lmdb>=1.4", "plyvel>=1.5"],
        # scripts/benchmark_augmentation.py compares against it when installed.
        "bench": SCRIPT_REQUIRES + ["albumentations>=1.4", "torchstain==1.4.1", "spams-bin>=2.6.14"],
    },
    entry_points={
        # One module per command under caffe_layers/cli/, each with main(argv=None).
        "console_scripts": [
            f"caffe-stain-{command} = caffe_layers.cli.{command}:main"
            for command in ("experiment", "prepare", "train", "segment", "compare", "meanfile", "normalize",
                            "estimate", "lmdb", "retrofit")
        ],
    },
    classifiers=[
        "Programming Language :: Python :: 3.11",
        "Topic :: Scientific/Engineering :: Image Processing",
    ],
)
