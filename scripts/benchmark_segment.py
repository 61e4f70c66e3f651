"""Whole-image segmentation speed: Caffe against OpenCV's DNN engine, and time and memory by image size.

Default (engines side by side): for each model and tile size (256, 512, 1024 pixels, overlap
64), the real hgsc_nest H&E (1500×1500) is segmented through ``segment_tiled`` by Caffe and by
the OpenCV engine, one after the other, each in a fresh process (so neither engine's thread pool
or memory is warm from the other); then the seconds per megapixel of each, their ratio and the
largest |Δp| between the two probability maps are printed. ``--rounds N`` repeats the
alternation and keeps each row's fastest round. Loading the net (and OpenCV's rewrite) is not
timed; one warm-up forward of a tile is run first. Without ``--model`` the experiment's
architecture is built from :func:`caffe_layers.net.training.templates.unet_deploy` (depth 2, base width 16; mean
file and per-patch centring) with seeded random weights; ``--models results/models`` takes the
models an experiment run exported.

``--tune`` times the OpenCV engine on 256-pixel tiles for several thread counts and batch sizes
(tiles per forward). ``--sizes`` times one engine (``--engine``) on mirror-tiled images of each
size, each in its own process, with its peak memory.

    .venv/bin/python scripts/benchmark_segment.py
    .venv/bin/python scripts/benchmark_segment.py --models results/models --rounds 2
    .venv/bin/python scripts/benchmark_segment.py --tune
    .venv/bin/python scripts/benchmark_segment.py --sizes 1000 2000 4000 --engine opencv \\
        --model results/models/patchmean_aug/deploy.prototxt --weights results/models/patchmean_aug/weights.caffemodel
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
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ENGINES = ("auto", "caffe", "opencv", "onnxruntime")


def _image(size=None):
    import numpy as np

    from caffe_layers.sample_data import load_hgsc_nest

    rgb, _ = load_hgsc_nest()
    if size is None or size == rgb.shape[0] == rgb.shape[1]:
        return rgb
    if size < min(rgb.shape[:2]):
        return np.ascontiguousarray(rgb[:size, :size])
    reps = -(-size // rgb.shape[0])
    return np.pad(rgb, ((0, rgb.shape[0] * (reps - 1)), (0, rgb.shape[1] * (reps - 1)), (0, 0)),
                  mode="symmetric")[:size, :size]


def _segmenter(engine, model, weights, threads, tile):
    from caffe_layers.net.inference.engines import make_segmenter
    from caffe_layers.net.inference.caffe_engine import use_cpu

    use_cpu()
    return make_segmenter(model, weights, engine, tile=tile, threads=threads, log=None)


def _forward_seconds(segmenter, shapes, rounds=2):
    """Seconds of the engine's forwards alone over the batch shapes ``segment_tiled`` fed it (best of ``rounds``).

    Same engine, same shapes, same number of calls, on a tile of the image: what the in-memory
    segmentation would cost if reading tiles, padding and writing the map were free.
    """
    import numpy as np

    rng = np.random.default_rng(0)
    inputs = {shape: rng.uniform(0, 255, shape).astype(np.float32) for shape in set(shapes)}
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for shape in shapes:
            segmenter(inputs[shape])
        best = min(best, time.perf_counter() - start)
    return best


def _timed(engine, model, weights, tile, overlap, batch, threads, size=None, prob_path=None):
    """Segment one image; return the measurement as a dict (runs in a child process)."""
    import numpy as np

    from caffe_layers.tiling import segment_tiled

    image = _image(size)
    segmenter = _segmenter(engine, model, weights, threads, tile)
    side = min(tile, image.shape[0])
    warm = np.repeat(image[None, :side, :side].transpose(0, 3, 1, 2).astype(np.float32), batch, axis=0)
    segmenter(warm)  # allocation at this shape (both engines), OpenCV's layer set-up
    shapes = []

    def recorded(tiles):
        shapes.append(tiles.shape)
        return segmenter(tiles)

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    prob = segment_tiled(recorded, image, tile=tile, overlap=overlap, multiple=4, batch_size=batch)
    elapsed = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    forward = _forward_seconds(segmenter, shapes)
    net_pixels = sum(n * h * w for n, _, h, w in shapes)
    if prob_path:
        np.save(prob_path, prob)
    megapixels = image.shape[0] * image.shape[1] / 1e6
    return dict(engine=segmenter.engine_choice.engine, seconds=elapsed, s_per_mpx=elapsed / megapixels,
                forward_s=forward, net_pixels=net_pixels, forward_s_per_net_mpx=forward / net_pixels * 1e6,
                size=list(image.shape[:2]), peak_rss_mb=peak / 1024, rss_before_mb=before / 1024,
                image_mb=image.nbytes / 2**20, prob_mb=prob.nbytes / 2**20, reason=segmenter.engine_choice.reason)


def _child(args, **overrides):
    """Run one measurement in a fresh process; return its dict."""
    options = dict(engine=args.engine, model=args.model[0] if args.model else None,
                   weights=args.weights[0] if args.weights else None, tile=args.tile, overlap=args.overlap,
                   batch=args.batch, threads=args.threads, size=args.image_size, prob_path=None)
    options.update(overrides)
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(options)], capture_output=True, text=True,
                         cwd=args.cwd)
    if out.returncode != 0:
        raise SystemExit(f"measurement {options} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _template_models(folder, centrings=("meanfile", "patchmean")):
    """The experiment's centrings (depth 2, width 16) with seeded random He weights."""
    import caffe
    import numpy as np

    from caffe_layers.net import meanfile
    from caffe_layers.net.training import templates as unet

    caffe.set_mode_cpu()
    rgb = _image()
    models = []
    for centring in centrings:
        mean_file = None
        if centring == "meanfile":
            # Flat, as caffe-stain-prepare writes it for random patches: the slide's channel means.
            mean_file = folder / "mean.binaryproto"
            channel_mean = rgb.reshape(-1, 3).mean(axis=0).astype(np.float32)
            meanfile.write_mean_binaryproto(mean_file, np.broadcast_to(channel_mean[:, None, None], (3, 64, 64)),
                                            overwrite=True)
        deploy = folder / f"{centring}_deploy.prototxt"
        deploy.write_text(unet.net_to_text(unet.unet_deploy(centring=centring, mean_file=mean_file,
                                                            input_shape=(1, 3, 256, 256))))
        net = caffe.Net(str(deploy), caffe.TEST)
        rng = np.random.default_rng(0)
        for blobs in net.params.values():
            blobs[0].data[...] = rng.normal(0, np.sqrt(2.0 / np.prod(blobs[0].data.shape[1:])), blobs[0].data.shape)
            blobs[1].data[...] = rng.normal(0, 0.1, blobs[1].data.shape)
        weights = folder / f"{centring}.caffemodel"
        net.save(str(weights))
        models.append((f"{centring} (random weights)", deploy, weights))
    return models


def _models(args, folder):
    if args.model:
        if len(args.model) != len(args.weights or []):
            raise SystemExit("give one --weights per --model")
        return [(Path(m).parent.name or Path(m).stem, Path(m).resolve(), Path(w).resolve())
                for m, w in zip(args.model, args.weights)]
    if args.models:
        found = sorted(Path(args.models).glob("*/deploy.prototxt"))
        if not found:
            raise SystemExit(f"no */deploy.prototxt under {args.models}")
        return [(deploy.parent.name, deploy.resolve(), (deploy.parent / "weights.caffemodel").resolve())
                for deploy in found]
    return _template_models(folder)


def compare_engines(args):
    import cv2
    import numpy as np

    engines = args.engines
    reference = engines[0]
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        models = _models(args, folder)
        print(f"hgsc_nest H&E {args.image_size}×{args.image_size}, overlap {args.overlap}, batch {args.batch}, "
              f"threads {args.threads or 'default'} (OpenCV {cv2.__version__}); best of {args.rounds} round(s), "
              f"each engine in its own process, alternating")
        print("s/MP: segment_tiled over the image; fwd: the engine's forwards alone over the same tiles; "
              f"×{reference}: speed-up over {reference}; |Δp|: largest difference from {reference}")
        header = f"{'model':<26} {'tile':>5}" + "".join(
            f" {engine + ' s/MP':>15} {'fwd':>6} {'/fwd':>5}" + ("" if engine == reference else
                                                              f" {'×' + reference:>8} {'|Δp|':>8}")
            for engine in engines)
        print(header)
        rows = []
        for name, deploy, weights in models:
            for tile in args.tiles:
                best = {}
                for round_index in range(args.rounds):
                    order = engines if round_index % 2 == 0 else engines[::-1]
                    for engine in order:
                        path = folder / f"{engine}.npy"
                        row = _child(args, engine=engine, model=str(deploy), weights=str(weights), tile=tile,
                                     prob_path=str(path))
                        if engine not in best or row["s_per_mpx"] < best[engine]["s_per_mpx"]:
                            best[engine] = row
                expected = np.load(folder / f"{reference}.npy")
                line = f"{name:<26} {tile:>5}"
                for engine in engines:
                    measured = best[engine]
                    mp = measured["size"][0] * measured["size"][1] / 1e6
                    fwd_per_mp = measured["forward_s"] / mp
                    row = dict(model=name, tile=tile, engine=engine, s_per_mpx=measured["s_per_mpx"],
                               forward_s_per_mpx=fwd_per_mp, over_forward=measured["seconds"] / measured["forward_s"],
                               forward_s_per_net_mpx=measured["forward_s_per_net_mpx"])
                    line += f" {measured['s_per_mpx']:15.3f} {fwd_per_mp:6.3f} {row['over_forward']:5.2f}"
                    if engine != reference:
                        row["speedup"] = best[reference]["s_per_mpx"] / measured["s_per_mpx"]
                        row["max_abs_diff"] = float(np.abs(np.load(folder / f"{engine}.npy") - expected).max())
                        line += f" {row['speedup']:7.2f}× {row['max_abs_diff']:8.1e}"
                    rows.append(row)
                print(line, flush=True)
        for engine in engines[1:]:
            mine = [row for row in rows if row["engine"] == engine]
            print(f"{engine} / {reference} speed-up: {min(r['speedup'] for r in mine):.2f}–"
                  f"{max(r['speedup'] for r in mine):.2f}×; max |Δp| {max(r['max_abs_diff'] for r in mine):.1e} "
                  f"(engines' tolerance 1e-4)")
        for engine in engines:
            over = [row["over_forward"] for row in rows if row["engine"] == engine]
            print(f"{engine}: segment_tiled / forwards alone {min(over):.2f}–{max(over):.2f}× (goal ≤ 1.3×)")
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))


def tune(args):
    """OpenCV threads × batch on 256-pixel tiles of the patch-mean template."""
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        name, deploy, weights = _models(args, folder)[-1]
        print(f"OpenCV engine, {name}, tile {args.tile}, overlap {args.overlap}, hgsc_nest {args.image_size}²; best of "
              f"{args.rounds} round(s)")
        grid = [(threads, batch) for threads in args.tune_threads for batch in args.tune_batches]
        best = {}
        for _ in range(args.rounds):
            for threads, batch in grid:
                row = _child(args, engine="opencv", model=str(deploy), weights=str(weights), threads=threads,
                             batch=batch)
                key = (threads, batch)
                best[key] = min(best.get(key, float("inf")), row["s_per_mpx"])
        print(f"{'threads':>7} " + " ".join(f"{'batch ' + str(b):>9}" for b in args.tune_batches) + "   (s/MP)")
        for threads in args.tune_threads:
            print(f"{threads:>7} " + " ".join(f"{best[threads, b]:9.3f}" for b in args.tune_batches))


def by_size(args):
    print(f"engine {args.engine}, tile {args.tile}, overlap {args.overlap}, batch {args.batch}")
    print(f"{'size':>6} {'engine':>7} {'s':>8} {'s/Mpx':>7} {'peak RSS MB':>12} {'image MB':>9} {'prob MB':>8}")
    for size in args.sizes:
        row = _child(args, size=size)
        print(f"{size:>6} {row['engine']:>7} {row['seconds']:8.1f} {row['s_per_mpx']:7.2f} {row['peak_rss_mb']:12.0f} "
              f"{row['image_mb']:9.0f} {row['prob_mb']:8.0f}", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", help="deploy prototxt (repeatable, with --weights)")
    parser.add_argument("--weights", action="append", help=".caffemodel of the --model before it")
    parser.add_argument("--models", help="folder of exported models (<name>/deploy.prototxt, weights.caffemodel)")
    parser.add_argument("--tiles", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--tile", type=int, default=256, help="tile of --tune and --sizes")
    parser.add_argument("--overlap", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=1500,
                        help="side of the image of the comparison and --tune (default 1500: hgsc_nest itself; "
                             "smaller: its top-left crop, larger: mirror-tiled)")
    parser.add_argument("--batch", type=int, default=1, help="tiles per forward")
    parser.add_argument("--threads", type=int, default=None, help="OpenCV threads (default: OpenCV's, one per core)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--json", help="also write the engine comparison rows here")
    parser.add_argument("--tune", action="store_true")
    parser.add_argument("--tune-threads", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--tune-batches", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--sizes", type=int, nargs="+")
    parser.add_argument("--engine", choices=ENGINES, default="auto", help="engine of --sizes")
    parser.add_argument("--engines", nargs="+", choices=ENGINES[1:], default=["caffe", "opencv"],
                        help="engines compared side by side; the first is the reference (default caffe opencv)")
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny run for the test suite: 160-pixel crop, 96-pixel tiles, overlap 32, one round")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.image_size, args.tiles, args.tile, args.overlap, args.rounds = 160, [96], 96, 32, 1
        args.tune_threads, args.tune_batches = [1], [1, 2]
    args.cwd = os.getcwd()  # mean files in exported deploy nets are relative to it
    if args.child:
        print(json.dumps(_timed(**json.loads(args.child))))
        return 0
    if args.sizes:
        if not args.model:
            parser.error("--sizes needs --model and --weights")
        by_size(args)
    elif args.tune:
        tune(args)
    else:
        compare_engines(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
