"""Whole-slide segmentation: seconds per tissue megapixel, 2 workers against 1, glass skipping, memory.

Builds a pyramidal TIFF of real H&E (the packaged hgsc_nest image, 1500×1500, mirror-tiled to
``--size`` × ``--size`` pixels at 0.5 µm/px, JPEG tiles of 256 pixels like an SVS) with
``--glass`` of its area white glass in smooth islands, written tile by tile in a temporary
folder. Then it segments the slide, each configuration in a fresh process:

* ``process``: in this process (``caffe-stain-segment`` without ``--workers``; OpenCV's own
  threads on every core);
* ``workers=1`` and ``workers=2``: a dask LocalCluster of 1 or 2 single-threaded workers;
* ``no-skip``: in-process with tissue detection off (every tile segmented), for the saving of
  glass skipping (its seconds per tissue megapixel use the tissue the other runs detect).

For each it prints the seconds (planning, segmenting and writing the outputs), the seconds
per tissue megapixel, the peak resident memory (VmHWM) of the segmenting process or of each
worker (the in-process figure includes the ``auto`` engine check, which runs Caffe once),
and whether the masks are identical; then the speed-up of 2 workers over 1 and the saving of
skipping glass. The engine is ``--engine`` (default ``auto``: OpenCV after its check against
Caffe). The model is ``--model-dir`` (deploy.prototxt, weights.caffemodel, model_card.yaml),
e.g. ``results/models/patchmean_aug`` of an experiment run; without it, the experiment's
patch-mean U-Net (depth 2, width 16) with seeded random weights (``--save-model DIR`` keeps
that folder, e.g. to run an older checkout's script on the same model). ``--smoke`` is a tiny
run for the test suite (an 800-pixel slide, in-process and one worker).

    .venv/bin/python scripts/benchmark_slides.py --size 4000 --configs workers=1 workers=2
    .venv/bin/python scripts/benchmark_slides.py --model-dir results/models/patchmean_aug
    .venv/bin/python scripts/benchmark_slides.py --model-dir results/models/patchmean_aug --size 8000
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("GLOG_minloglevel", "2")
REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

GLASS_RGB = 240


def _mirror(index, period):
    """Indices of an image mirror-tiled with period ``period`` (edges repeated, like np.pad symmetric)."""
    import numpy as np

    index = index % (2 * period)
    return np.where(index < period, index, 2 * period - 1 - index)


def build_slide(path, size, glass, mpp=0.5, tile=256, seed=0):
    """Write the benchmark slide; returns the fraction of glass pixels at level 0."""
    import cv2
    import numpy as np
    import tifffile

    from caffe_layers.sample_data import load_hgsc_nest

    base, _ = load_hgsc_nest()
    rng = np.random.default_rng(seed)
    coarse = rng.normal(size=(max(3, size // 2500), max(3, size // 2500)))
    low = max(64, size // 64)  # glass layout at 1/64 of level 0
    field = cv2.resize(coarse, (low, low), interpolation=cv2.INTER_CUBIC)
    glass_low = field < np.quantile(field, glass)
    levels = [size]
    while levels[-1] > 1024:
        levels.append(-(-levels[-1] // 2))

    def tiles(level):
        scale = 2 ** level
        image = base if scale == 1 else cv2.resize(base, (1500 // scale, 1500 // scale), interpolation=cv2.INTER_AREA)
        period = image.shape[0]
        side = levels[level]
        for y in range(0, side, tile):
            rows = _mirror(np.arange(y, min(y + tile, side)), period)
            for x in range(0, side, tile):
                cols = _mirror(np.arange(x, min(x + tile, side)), period)
                block = image[np.ix_(rows, cols)]
                gy = np.minimum((np.arange(y, y + len(rows)) * scale * low) // size, low - 1)
                gx = np.minimum((np.arange(x, x + len(cols)) * scale * low) // size, low - 1)
                block[glass_low[np.ix_(gy, gx)]] = GLASS_RGB
                yield block

    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for level, side in enumerate(levels):
            per_cm = 1e4 / (mpp * 2 ** level)
            tif.write(tiles(level), shape=(side, side, 3), dtype=np.uint8, tile=(tile, tile), compression="jpeg",
                      compressionargs={"level": 90}, photometric="rgb", subfiletype=0 if level == 0 else 1,
                      resolution=(per_cm, per_cm), resolutionunit="CENTIMETER", metadata=None)
    return float(glass_low.mean())


def peak_mb():
    """This process's peak resident memory (VmHWM: since its exec, unlike ru_maxrss, which a spawned
    worker inherits from the process it was forked from)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def run_one(config):
    """One configuration (in its own process): segment, then report time and peak memory as JSON."""
    from caffe_layers.model_card import load_model_card
    from caffe_layers.net.inference.engines import make_segmenter
    from caffe_layers.net.inference.caffe_engine import use_cpu
    from caffe_layers.net.inference.slides import segment_slides
    from caffe_layers.wsi import SlideSettings

    use_cpu()
    model = Path(config["model_dir"])
    card = load_model_card(model / "model_card.yaml")
    deploy, weights = model / "deploy.prototxt", model / "weights.caffemodel"
    segmenter = make_segmenter(deploy, weights, config["engine"], tile=256, multiple=card.size_multiple,
                               batch=config.get("batch", 4), log=None, card=card)
    radius = getattr(segmenter, "receptive_radius", None)  # the overlap caffe-stain-segment takes by default
    overlap = config["overlap"] if config.get("overlap") is not None else 2 * radius if radius is not None else 64
    settings = SlideSettings(multiple=card.size_multiple, batch_size=config.get("batch", 4), block=config["block"],
                             mpp=0.5, overlap=overlap, white_threshold=255.0 if config["no_skip"] else 200.0)
    common = dict(deploy=deploy, weights=weights, card=card, progress=False, log=lambda message: None)
    record = {"engine": segmenter.engine_choice.engine, "overlap": overlap}
    started = time.perf_counter()
    if config["workers"]:
        from caffe_layers.wsi.cluster import slide_client

        with slide_client(workers=config["workers"]) as client:
            client.run(lambda: None)  # workers up before the clock starts
            started = time.perf_counter()
            summary, = segment_slides(segmenter, [config["slide"]], config["out"], settings, client=client, **common)
            record["seconds"] = time.perf_counter() - started
            record["peak_mb_per_worker"] = sorted(client.run(peak_mb).values())
    else:
        summary, = segment_slides(segmenter, [config["slide"]], config["out"], settings, **common)
        record["seconds"] = time.perf_counter() - started
    record["peak_mb_process"] = peak_mb()  # with --workers: the client (engine check, outputs)
    record.update({key: summary.get(key) for key in ("tissue_fraction", "glass_skipped_fraction", "nuclei",
                                                     "net_tiles_run", "level_shape", "net_pixels_per_tissue_pixel")})
    print(json.dumps(record))


def template_model_dir(folder):
    """The experiment's patch-mean U-Net with seeded random weights as a model folder (deploy, weights, card)."""
    import shutil

    from benchmark_segment import _template_models

    from caffe_layers.model_card import write_model_card

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (name, deploy, weights), = _template_models(folder, centrings=("patchmean",))
    shutil.move(deploy, folder / "deploy.prototxt")
    shutil.move(weights, folder / "weights.caffemodel")
    write_model_card(folder / "model_card.yaml", {"size_multiple": 4}, overwrite=True, comment=name)
    return folder


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", help="folder with deploy.prototxt, weights.caffemodel, model_card.yaml "
                                            "(default: the patch-mean U-Net template with random weights)")
    parser.add_argument("--save-model", help="with no --model-dir: keep the template model folder here")
    parser.add_argument("--smoke", action="store_true", help="tiny run for the test suite")
    parser.add_argument("--size", type=int, default=20000, help="slide side in pixels (default 20000)")
    parser.add_argument("--glass", type=float, default=0.4, help="fraction of glass (default 0.4)")
    parser.add_argument("--block", type=int, default=1024)
    parser.add_argument("--engine", default="auto", choices=("auto", "caffe", "opencv", "onnxruntime"))
    parser.add_argument("--batch", type=int, default=4, help="tiles per forward (default 4)")
    parser.add_argument("--overlap", type=int, default=None,
                        help="tile overlap (default: twice the net's receptive-field radius, as caffe-stain-segment)")
    parser.add_argument("--configs", nargs="+", default=["process", "workers=1", "workers=2", "no-skip"])
    parser.add_argument("--run-one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_one:
        return run_one(json.loads(args.run_one))
    if args.smoke:
        args.size, args.configs = 800, ["process", "workers=1"]
    import numpy as np
    import tifffile

    with tempfile.TemporaryDirectory(prefix="benchmark-slides-") as folder:
        if args.model_dir is None:
            args.model_dir = str(template_model_dir(args.save_model or Path(folder) / "model"))
        slide = Path(folder) / "slide.tif"
        started = time.perf_counter()
        glass = build_slide(slide, args.size, args.glass)
        print(f"slide: {args.size}×{args.size} px of mirror-tiled hgsc_nest H&E at 0.5 µm/px, {glass:.1%} glass, "
              f"{slide.stat().st_size / 1e6:.0f} MB JPEG pyramidal TIFF, built in {time.perf_counter() - started:.0f} s",
              flush=True)
        results, masks = {}, {}
        for name in args.configs:
            out = Path(folder) / name.replace("=", "")
            config = {"model_dir": str(Path(args.model_dir).resolve()), "slide": str(slide), "out": str(out),
                      "engine": args.engine, "block": args.block, "no_skip": name == "no-skip",
                      "batch": args.batch, "overlap": args.overlap,
                      "workers": int(name.split("=")[1]) if name.startswith("workers=") else 0}
            env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
            result = subprocess.run([sys.executable, __file__, "--model-dir", args.model_dir,
                                     "--run-one", json.dumps(config)], capture_output=True, text=True, env=env)
            if result.returncode != 0:
                sys.exit(f"{name} failed:\n{result.stderr[-3000:]}")
            record = json.loads(result.stdout.strip().splitlines()[-1])
            height, width = record["level_shape"]
            # Without skipping every pixel counts as tissue: per tissue MP, use the detected tissue.
            tissue = results.get("process", record)["tissue_fraction"] if name == "no-skip" else \
                record["tissue_fraction"]
            tissue_mp = tissue * height * width / 1e6
            record["s_per_tissue_mp"] = record["seconds"] / tissue_mp
            results[name] = record
            masks[name] = tifffile.imread(out / "slide_pred.tif")
            memory = record.get("peak_mb_per_worker", record["peak_mb_process"])
            print(f"{name:>10}: {record['seconds']:7.1f} s, {record['s_per_tissue_mp']:.2f} s per tissue MP "
                  f"(tissue {record['tissue_fraction']:.1%}, {tissue_mp:.0f} MP; glass skipped "
                  f"{record['glass_skipped_fraction']:.1%}), {record['nuclei']} nuclei, {record['net_tiles_run']} net "
                  f"tiles ({record.get('net_pixels_per_tissue_pixel')} net px per tissue px, overlap "
                  f"{record.get('overlap')}), engine {record['engine']}, peak memory {memory} MB"
                  + (" per worker" if "peak_mb_per_worker" in record else ""), flush=True)
            for path in out.glob("slide_*"):
                path.unlink()
        skipping = [n for n in masks if n != "no-skip"]
        same = all(np.array_equal(masks[skipping[0]], masks[n]) for n in skipping[1:])
        print(f"masks of {', '.join(skipping)} identical: {same}")
        if "workers=1" in results and "workers=2" in results:
            print(f"speed-up of 2 workers over 1: {results['workers=1']['seconds'] / results['workers=2']['seconds']:.2f}×")
        if "no-skip" in results and "process" in results:
            saved = 1 - results["process"]["seconds"] / results["no-skip"]["seconds"]
            print(f"glass skipping saves {saved:.1%} of the time ({results['no-skip']['seconds']:.1f} s without it)")
        print(json.dumps({"size": args.size, "glass": glass, "results": results}))


if __name__ == "__main__":
    main()
