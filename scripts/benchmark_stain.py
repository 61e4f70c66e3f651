"""Benchmark caffe_layers.stain against the field's stain tools, side by side, in one run.

Every row normalises the same 2000x2000x3 uint8 H&E image -- the real ``hgsc_nest.jpg``
(histolytics data package) mirror-tiled to 2000x2000 -- to the same reference, the 1000x1000
tiatoolbox ``target_image.png``; a timed call is *fit on the reference + transform of the image*.
Rounds time every row once, in turn, so load on a shared machine hits all rows alike; the table
gives the median over rounds, and every ratio is the median of the per-round ratios.

Rows:

* ours (``caffe_layers.stain``) and, from the commit this work started from (``--before``, read
  with ``git show``), the implementation before it, for the speed-ups;
* the field's, each only if it imports (``pip install -e .[bench]``; see the README): scikit-image
  ``match_histograms``; StainTools 2.1.2 (Reinhard, Macenko, Vahadane -- the latter two need
  SPAMS: ``spams-bin``); torchstain 1.4.1, numpy backend (Reinhard, Macenko); HistomicsTK
  (Reinhard, Macenko-based ``deconvolution_based_normalization``, and the stain augmentation
  ``rgb_perturb_stain_concentration``); tiatoolbox's normalisers. A library that does not import
  is reported and skipped.

Agreement with ours: the mean absolute difference of the normalised images (uint8 levels, all
pixels and tissue pixels) and the angles between the fitted template stain vectors (H, E).

    python scripts/benchmark_stain.py [--rounds 5] [--size 2000] [--before c180257]
"""

from __future__ import annotations

import argparse
import importlib
import math
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from caffe_layers import sample_data, stain  # noqa: E402

#: The commit before the stain-tools work: its implementations are the "before" rows.
BEFORE = "c180257"


def tiled_he(size=2000):
    """Real H&E tile grown to ``size x size`` by mirror-tiling (no synthetic pixels)."""
    rgb, _ = sample_data.load_hgsc_nest()
    reps = (-(-size // rgb.shape[0]), -(-size // rgb.shape[1]))
    rows = [np.concatenate([rgb if j % 2 == 0 else rgb[:, ::-1] for j in range(reps[1])], axis=1)
            for _ in range(reps[0])]
    grown = np.concatenate([row if i % 2 == 0 else row[::-1] for i, row in enumerate(rows)], axis=0)
    return np.ascontiguousarray(grown[:size, :size])


# --------------------------------------------------------------------------- the "before" rows

def load_before(commit):
    """``caffe_layers.stain`` histogram/normalizers as of ``commit`` (a package in a temp folder),
    or the reason they cannot be loaded."""
    files = ["caffe_layers/image_io.py", "caffe_layers/stain/tissue.py", "caffe_layers/stain/optical_density.py",
             "caffe_layers/stain/histogram.py", "caffe_layers/stain/normalizers.py"]
    root = Path(tempfile.mkdtemp(prefix="stain_before_"))
    package = root / "stain_before"
    (package / "stain").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "stain" / "__init__.py").write_text("")
    for name in files:
        try:
            source = subprocess.run(["git", "-C", str(REPO), "show", f"{commit}:{name}"], check=True,
                                    capture_output=True, text=True).stdout
        except (OSError, subprocess.CalledProcessError) as error:
            return None, f"cannot read {name} at {commit} ({error}); not a git checkout?"
        (package / Path(name).relative_to("caffe_layers")).write_text(source)
    sys.path.insert(0, str(root))
    return importlib.import_module("stain_before.stain.normalizers"), \
        importlib.import_module("stain_before.stain.histogram")


# --------------------------------------------------------------------------- the field's rows

def field_rows(image, reference):
    """{row name: (method, callable -> image, template stain vectors (2, 3) or None)}, and notes."""
    rows, notes = {}, []

    def unit_rows(vectors):
        vectors = np.asarray(vectors, dtype=float)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

    try:
        from skimage.exposure import match_histograms as skimage_match
        rows["scikit-image match_histograms"] = (
            "histmatch", lambda: skimage_match(image, reference, channel_axis=-1), None)
    except ImportError as error:
        notes.append(f"scikit-image: skipped ({error})")

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import staintools
        # StainTools writes 1 over the zeros of its inputs: give it its own copies.
        st_image, st_reference = image.copy(), reference.copy()

        def staintools_reinhard():
            normalizer = staintools.ReinhardColorNormalizer()
            normalizer.fit(st_reference)
            return normalizer.transform(st_image)

        rows["StainTools 2.1.2 Reinhard"] = ("reinhard", staintools_reinhard, None)
        for method in ("macenko", "vahadane"):
            def run(method=method):
                normalizer = staintools.StainNormalizer(method)
                normalizer.fit(st_reference)
                return normalizer.transform(st_image)

            extractor = {"macenko": staintools.MacenkoStainExtractor,
                         "vahadane": staintools.VahadaneStainExtractor}[method]
            rows[f"StainTools 2.1.2 {method.capitalize()}"] = (
                method, run, lambda extractor=extractor: unit_rows(extractor.get_stain_matrix(st_reference)))
    except ImportError as error:
        notes.append(f"StainTools: skipped ({error}; Macenko and Vahadane need SPAMS: pip install spams-bin)")

    try:
        from torchstain.numpy.normalizers.macenko import NumpyMacenkoNormalizer
        from torchstain.numpy.normalizers.reinhard import NumpyReinhardNormalizer

        def torchstain_reinhard():
            normalizer = NumpyReinhardNormalizer()
            normalizer.fit(reference)
            return normalizer.normalize(image)

        def torchstain_macenko():
            normalizer = NumpyMacenkoNormalizer()
            normalizer.fit(reference)
            return normalizer.normalize(image, stains=False)[0]

        def torchstain_vectors():
            normalizer = NumpyMacenkoNormalizer()
            normalizer.fit(reference)
            return unit_rows(normalizer.HERef.T)

        rows["torchstain 1.4.1 (numpy) Reinhard"] = ("reinhard", torchstain_reinhard, None)
        rows["torchstain 1.4.1 (numpy) Macenko"] = ("macenko", torchstain_macenko, torchstain_vectors)
    except ImportError as error:
        notes.append(f"torchstain: skipped ({error})")

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from histomicstk.preprocessing.augmentation import rgb_perturb_stain_concentration
            from histomicstk.preprocessing.color_conversion import lab_mean_std
            from histomicstk.preprocessing.color_deconvolution.color_deconvolution import stain_unmixing_routine
            from histomicstk.preprocessing.color_normalization import deconvolution_based_normalization, reinhard

        def histomicstk_reinhard():
            mean, std = lab_mean_std(reference)
            return reinhard(image, mean, std)

        def histomicstk_vectors():
            return unit_rows(stain_unmixing_routine(reference, stains=["hematoxylin", "eosin"])[:, :2].T)

        def histomicstk_perturb():
            np.random.seed(0)
            return rgb_perturb_stain_concentration(image)

        rows["HistomicsTK Reinhard (Ruderman lαβ)"] = ("reinhard", histomicstk_reinhard, None)
        rows["HistomicsTK Macenko deconvolution normalisation"] = (
            "macenko", lambda: np.clip(deconvolution_based_normalization(image, im_target=reference), 0, 255)
            .astype(np.uint8), histomicstk_vectors)
        rows["HistomicsTK rgb_perturb_stain_concentration"] = ("augment", histomicstk_perturb, None)
    except ImportError as error:
        notes.append(f"HistomicsTK: skipped ({error})")

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from tiatoolbox.tools import stainnorm
        for method in ("reinhard", "macenko", "vahadane"):
            def run(method=method):
                normalizer = stainnorm.get_normalizer(method)
                normalizer.fit(reference)
                return normalizer.transform(image)

            rows[f"tiatoolbox {method.capitalize()}"] = (method, run, None)
    except Exception as error:  # its package imports dozens of modules; any failure means "not here"
        notes.append(f"tiatoolbox: skipped (its normalisers do not import: {type(error).__name__}: {error})")
    return rows, notes


# --------------------------------------------------------------------------- timing

def time_rounds(functions, rounds):
    """{name: [seconds per round]}: every round calls every function once, in turn."""
    for function in functions.values():  # warm-up (imports, caches, OpenCV's threads)
        function()
    seconds = {name: [] for name in functions}
    for _ in range(rounds):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            seconds[name].append(time.perf_counter() - start)
    return {name: np.array(values) for name, values in seconds.items()}


def angle(first, second):
    cosine = float(first @ second) / float(np.linalg.norm(first) * np.linalg.norm(second))
    return math.degrees(math.acos(min(1.0, max(-1.0, cosine))))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--size", type=int, default=2000)
    parser.add_argument("--before", default=BEFORE, help=f"commit of the 'before' rows (default {BEFORE})")
    parser.add_argument("--no-field", action="store_true", help="only our rows and the 'before' rows")
    args = parser.parse_args(argv)

    image = tiled_he(args.size)
    reference = sample_data.load_stained_examples()["tiatoolbox_target"]
    tissue = stain.tissue_mask(image)
    print(f"image {image.shape} {image.dtype} (tiled hgsc_nest), reference {reference.shape}; tissue fraction: "
          f"image {tissue.mean():.3f}, reference {stain.tissue_mask(reference).mean():.3f}; rounds={args.rounds}\n")

    def normaliser(cls, **options):
        return lambda: cls(**options).fit(reference).transform(image)

    ours = {
        "ours match_histograms": ("histmatch", lambda: stain.match_histograms(image, reference)),
        "ours match_histograms(ignore_white=True)": (
            "histmatch-masked", lambda: stain.match_histograms(image, reference, ignore_white=True)),
        "ours tissue_mask": ("mask", lambda: stain.tissue_mask(image)),
        "ours Reinhard": ("reinhard", normaliser(stain.ReinhardNormalizer)),
        "ours Reinhard (ignore_white=False)": ("reinhard", normaliser(stain.ReinhardNormalizer, ignore_white=False)),
        "ours Macenko": ("macenko", normaliser(stain.MacenkoNormalizer)),
        "ours Vahadane": ("vahadane", normaliser(stain.VahadaneNormalizer)),
        "ours stain augmentation (shift_stains, hue jitter)": (
            "augment", lambda: stain.shift_stains(image, (1.1, 0.9, 1.0), (0.01, -0.01, 0.0), rotation=(5.0, -5.0))),
    }
    vectors = {"ours Macenko": stain.MacenkoNormalizer().fit(reference).stain_matrix_,
               "ours Vahadane": stain.VahadaneNormalizer().fit(reference).stain_matrix_}
    functions = {name: function for name, (_, function) in ours.items()}
    methods = {name: method for name, (method, _) in ours.items()}

    notes = []
    loaded = load_before(args.before)
    if loaded[0] is None:
        notes.append(f"before: skipped ({loaded[1]})")
    else:
        before_normalizers, before_histogram = loaded
        functions.update({
            "before match_histograms": lambda: before_histogram.match_histograms(image, reference),
            "before match_histograms(ignore_white=True)": lambda: before_histogram.match_histograms(
                image, reference, ignore_white=True),
            "before Reinhard": lambda: before_normalizers.ReinhardNormalizer().fit(reference).transform(image),
            "before Macenko": lambda: before_normalizers.MacenkoNormalizer().fit(reference).transform(image),
        })
        methods.update({"before match_histograms": "histmatch", "before match_histograms(ignore_white=True)":
                        "histmatch-masked", "before Reinhard": "reinhard", "before Macenko": "macenko"})

    if not args.no_field:
        rows, field_notes = field_rows(image, reference)
        notes += field_notes
        for name, (method, function, vector_function) in rows.items():
            functions[name], methods[name] = function, method
            if vector_function is not None:
                try:
                    vectors[name] = vector_function()
                except Exception as error:  # a library failing on this image is a result, not a crash
                    notes.append(f"{name}: stain vectors failed ({type(error).__name__}: {error})")
    for name, function in list(functions.items()):  # a row that fails on this image is reported and dropped
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                function()
        except Exception as error:
            notes.append(f"{name}: failed ({type(error).__name__}: {error}); skipped")
            del functions[name]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        seconds = time_rounds(functions, args.rounds)
        outputs = {name: np.asarray(function()) for name, function in functions.items()}

    reference_rows = {"histmatch": "ours match_histograms",
                      "histmatch-masked": "ours match_histograms(ignore_white=True)",
                      "reinhard": "ours Reinhard", "macenko": "ours Macenko", "vahadane": "ours Vahadane"}
    print("| | method | ms | vs ours: mean abs. difference, all / tissue | stain vectors vs ours (H, E) |")
    print("|---|---|---|---|---|")
    for name in functions:
        method = methods[name]
        ours_name = reference_rows.get(method)
        agreement, angles = "", ""
        if ours_name and ours_name != name and ours_name in outputs and outputs[name].shape == image.shape:
            difference = np.abs(outputs[name].astype(np.int16) - outputs[ours_name])
            agreement = f"{difference.mean():.2f} / {difference[tissue].mean():.2f}"
        if name in vectors and ours_name in vectors and name != ours_name:
            angles = ", ".join(f"{angle(vectors[name][i], vectors[ours_name][i]):.1f}°" for i in range(2))
        print(f"| {name} | {method} | {np.median(seconds[name]) * 1e3:.1f} | {agreement} | {angles} |")
    print()
    for note in notes:
        print(f"note: {note}")
    print()

    def ratio(slow, fast):
        if slow not in seconds or fast not in seconds:
            return None
        return float(np.median(seconds[slow] / seconds[fast]))

    print(f"{'goal':<58} {'measured':>9}   target")
    goals = []
    masked = ratio("ours match_histograms(ignore_white=True)", "ours match_histograms")
    goals.append(("ours masked / unmasked matching", masked, "<= 1.3x", masked is not None and masked <= 1.3))
    before_masked = ratio("before match_histograms(ignore_white=True)", "before match_histograms")
    if before_masked is not None:
        goals.append(("  (before: masked / unmasked)", before_masked, "", None))
    for method in ("Reinhard", "Macenko"):
        speedup = ratio(f"before {method}", f"ours {method}")
        if speedup is not None:
            goals.append((f"{method}: before / ours", speedup, ">= 3x", speedup >= 3))
    for method, ours_name in (("histmatch", "ours match_histograms"), ("reinhard", "ours Reinhard"),
                              ("macenko", "ours Macenko"), ("vahadane", "ours Vahadane"),
                              ("augment", "ours stain augmentation (shift_stains, hue jitter)")):
        theirs = [name for name in functions if methods[name] == method and not name.startswith(("ours", "before"))]
        if not theirs or ours_name not in seconds:
            continue
        fastest = min(theirs, key=lambda name: np.median(seconds[name]))
        value = ratio(fastest, ours_name)
        goals.append((f"{method}: fastest of the field ({fastest}) / ours", value, ">= 1x", value >= 1))
    for label, value, target, met in goals:
        status = "" if met is None else ("OK" if met else "MISSED")
        print(f"{label:<58} {value:8.2f}x   {target:<7} {status}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
