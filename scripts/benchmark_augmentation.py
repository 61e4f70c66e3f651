#!/usr/bin/env python
"""Benchmark of the AugmentationLayer against the net it feeds and against per-image loops.

Everything is measured side by side in one run (median of repeats after warm-up; the augmentation
rows round-robin, one call of each per round, so load from other processes hits them alike) on a batch
of 16×3×256×256 float32 images in 0-255 with 16×1×256×256 labels:

* ``layer``: AugmentationLayer forward through pycaffe (rotate+flip+color, and +hed: today's
  colour path; and +stain_stats in LAB and in HED space, the stain-statistics colour path, with
  statistics fitted on the batch's own images by ``fit_stain_statistics``);
* ``core``: ``BatchAugmenter.augment_into`` alone (the layer minus pycaffe): one OpenCV
  flip/rotate/transpose per plane, then numpy multiply-add-clip in cache;
* ``naive``: ``naive_augment`` of ``tests/transforms/naive_reference.py`` (per-image, copies at every step),
  and the plainest per-image loop a user would write (np.flip/np.rot90 copies, ``x*a+b``,
  np.clip, allocating as it goes);
* ``albumentations`` (if installed): RandomRotate90 + HorizontalFlip + VerticalFlip +
  MultiplicativeNoise(per_channel) (= per-channel ``a``) + RGBShift (= per-channel ``b``), per
  image, on HWC float32 in [0, 1] (albumentations clips floats to [0, 1]) with the label as mask;
  the CHW<->HWC transposes and the /255, *255 scaling are counted, as a Caffe user pays them;
* a small U-Net forward+backward on the same batch (``caffe_layers.net.training.templates`` if available, else a
  2-level U-Net built here), the cost the augmentation should be negligible against (goal ≤ 5 %).

Usage: ``python scripts/benchmark_augmentation.py [--repeats 15] [--batch 16] [--size 256]``
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("GLOG_minloglevel", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

import caffe  # noqa: E402
from caffe_layers.stain.statistics import fit_stain_statistics  # noqa: E402
from caffe_layers.transforms import BatchAugmenter  # noqa: E402

# The per-image reference implementation is a test helper, not part of the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "transforms"))
from naive_reference import naive_augment  # noqa: E402

COLOR = {"rotate": True, "flip": True, "color": True, "color_a_min": 0.7, "color_a_max": 1.3}
HED = dict(COLOR, hed=True)
STATS_ROWS = {space: f"layer rotate+flip+color+stain_stats ({space} space)" for space in ("lab", "hed")}


def median_ms(function, repeats, warmup=2):
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def interleaved_medians(functions, repeats, warmup=2):
    """Median ms of each function, timed round-robin (one call of each per round), so that load
    from other processes on a shared machine hits every row alike and the ratios stay fair."""
    for function in functions.values():
        for _ in range(warmup):
            function()
    times = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * float(np.median(values)) for name, values in times.items()}


def layer_net(params, shape, label_shape, workdir, name):
    import json

    text = f"""
name: "augment_bench"
layer {{ name: "input" type: "Input" top: "data" top: "label"
  input_param {{ shape {{ {' '.join(f'dim: {d}' for d in shape)} }}
                shape {{ {' '.join(f'dim: {d}' for d in label_shape)} }} }} }}
layer {{ name: "augment" type: "Python" bottom: "data" bottom: "label" top: "aug" top: "aug_label"
  python_param {{ module: "caffe_layers.augmentation" layer: "AugmentationLayer"
                 param_str: '{json.dumps(dict(params, seed=0))}' }} }}
"""
    path = Path(workdir) / f"{name}.prototxt"
    path.write_text(text)
    return caffe.Net(str(path), caffe.TRAIN)


def unet_net(shape, workdir):
    """Small U-Net with SoftmaxWithLoss; returns (net, description)."""
    path = Path(workdir) / "unet.prototxt"
    try:
        from caffe_layers.net.training import templates as unet

        proto = unet.unet_deploy(centring="patchmean", depth=2, base_width=16, input_shape=shape)
        # Deploy net -> training net: label input, and the final Softmax becomes SoftmaxWithLoss.
        softmax = [layer for layer in proto.layer if layer.type == "Softmax"][-1]
        score = softmax.bottom[0]
        proto.layer.remove(softmax)
        label = proto.layer.add(name="label", type="Input")
        label.top.append("label")
        label.input_param.shape.add().dim.extend([shape[0], 1, shape[2], shape[3]])
        loss = proto.layer.add(name="loss", type="SoftmaxWithLoss")
        loss.bottom.extend([score, "label"])
        loss.top.append("loss")
        proto.force_backward = True
        path.write_text(str(proto))
        description = "caffe_layers.net.training.templates.unet_deploy(depth=2, base_width=16) + SoftmaxWithLoss"
    except (ImportError, AttributeError, TypeError) as error:
        path.write_text(str(_own_unet(shape)))
        description = f"2-level U-Net built in this script (caffe_layers.net.training.templates unusable: {error})"
    return caffe.Net(str(path), caffe.TRAIN), description


def _own_unet(shape):
    from caffe import layers as L
    from caffe import params as P

    def conv(bottom, width):
        return L.ReLU(L.Convolution(bottom, num_output=width, kernel_size=3, pad=1,
                                    weight_filler=dict(type="msra")), in_place=True)

    net = caffe.NetSpec()
    net.data, net.label = L.Input(shape=[dict(dim=list(shape)), dict(dim=[shape[0], 1, shape[2], shape[3]])], ntop=2)
    net.enc0 = conv(conv(net.data, 16), 16)
    net.enc1 = conv(conv(L.Pooling(net.enc0, pool=P.Pooling.MAX, kernel_size=2, stride=2), 32), 32)
    net.bottom = conv(conv(L.Pooling(net.enc1, pool=P.Pooling.MAX, kernel_size=2, stride=2), 64), 64)
    net.up1 = L.Deconvolution(net.bottom, convolution_param=dict(num_output=32, kernel_size=2, stride=2,
                                                                 weight_filler=dict(type="msra")))
    net.dec1 = conv(conv(L.Concat(net.enc1, net.up1), 32), 32)
    net.up0 = L.Deconvolution(net.dec1, convolution_param=dict(num_output=16, kernel_size=2, stride=2,
                                                               weight_filler=dict(type="msra")))
    net.dec0 = conv(conv(L.Concat(net.enc0, net.up0), 16), 16)
    net.score = L.Convolution(net.dec0, num_output=2, kernel_size=1, weight_filler=dict(type="xavier"))
    net.loss = L.SoftmaxWithLoss(net.score, net.label)
    proto = net.to_proto()
    proto.force_backward = True
    return proto


def plain_loop(images, labels, rng, a_range=(0.7, 1.3), b_range=(-10.0, 10.0)):
    """What a user would write: per image, copies at every step."""
    out_images, out_labels = [], []
    for image, label in zip(images, labels):
        k = rng.integers(0, 4)
        if rng.random() < 0.5:
            image, label = np.flip(image, 2).copy(), np.flip(label, 2).copy()
        if rng.random() < 0.5:
            image, label = np.flip(image, 1).copy(), np.flip(label, 1).copy()
        image, label = np.rot90(image, k, (1, 2)).copy(), np.rot90(label, k, (1, 2)).copy()
        a = rng.uniform(*a_range, (image.shape[0], 1, 1)).astype(np.float32)
        b = rng.uniform(*b_range, (image.shape[0], 1, 1)).astype(np.float32)
        out_images.append(np.clip(image * a + b, 0, 255))
        out_labels.append(label)
    return np.stack(out_images), np.stack(out_labels)


def albumentations_loop():
    try:
        import albumentations as A
    except ImportError:
        return None, "albumentations not installed"
    transform = A.Compose([
        A.RandomRotate90(p=1.0),
        A.HorizontalFlip(p=0.5),
        A.VerticalFlip(p=0.5),
        A.MultiplicativeNoise(multiplier=(0.7, 1.3), per_channel=True, elementwise=False, p=1.0),
        A.RGBShift(r_shift_limit=10 / 255, g_shift_limit=10 / 255, b_shift_limit=10 / 255, p=1.0),
    ])

    def run(images, labels):
        out_images = np.empty_like(images)
        out_labels = np.empty_like(labels)
        for i in range(len(images)):
            result = transform(image=np.ascontiguousarray(images[i].transpose(1, 2, 0)) / 255.0,
                               mask=labels[i, 0])
            out_images[i] = result["image"].transpose(2, 0, 1) * 255.0
            out_labels[i, 0] = result["mask"]
        return out_images, out_labels

    return run, (f"albumentations {A.__version__}: RandomRotate90+H/VFlip+MultiplicativeNoise(per_channel)"
                 "+RGBShift, HWC float in [0,1]")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--unet-repeats", type=int, default=3)
    args = parser.parse_args(argv)

    caffe.set_mode_cpu()
    n, size = args.batch, args.size
    shape, label_shape = (n, 3, size, size), (n, 1, size, size)
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, shape).astype(np.float32)
    labels = rng.integers(0, 2, label_shape).astype(np.float32)
    print(f"batch: images {shape} float32 0-255, labels {label_shape}; median of {args.repeats} "
          f"(U-Net: {args.unet_repeats}) after warm-up; numpy {np.__version__}, OpenCV {cv2.__version__}")

    rows = []  # (name, ms)
    with tempfile.TemporaryDirectory() as workdir:
        functions = {}
        as_rgb = list(np.moveaxis(images, 1, -1).astype(np.uint8))  # the statistics' training images
        stats = {space: dict(COLOR, stain_stats=fit_stain_statistics(as_rgb, space=space)) for space in ("lab", "hed")}
        for name, params in (("layer rotate+flip+color", COLOR), ("layer rotate+flip+color+hed", HED),
                             (STATS_ROWS["lab"], stats["lab"]), (STATS_ROWS["hed"], stats["hed"])):
            net = layer_net(params, shape, label_shape, workdir, name.replace(" ", "_").replace("+", "_"))
            net.blobs["data"].data[...] = images
            net.blobs["label"].data[...] = labels
            functions[name] = net.forward

        augmenter = BatchAugmenter(seed=0, **COLOR)
        out_images, out_labels = np.empty_like(images), np.empty_like(labels)
        functions["core BatchAugmenter.augment_into"] = lambda: augmenter.augment_into(images, labels, out_images,
                                                                                        out_labels)
        functions["copy of the batch (np.copyto)"] = lambda: (np.copyto(out_images, images),
                                                              np.copyto(out_labels, labels))
        naive_rng = np.random.default_rng(1)
        functions["naive_augment (per image)"] = lambda: naive_augment(images, labels, COLOR, naive_rng)
        functions["plain per-image numpy loop"] = lambda: plain_loop(images, labels, naive_rng)
        functions["naive_augment +hed (per image)"] = lambda: naive_augment(images, labels, HED, naive_rng)
        album, album_note = albumentations_loop()
        if album is not None:
            functions["albumentations (per image)"] = lambda: album(images, labels)
        rows.extend(interleaved_medians(functions, args.repeats).items())
        layer_ms, hed_ms = rows[0][1], rows[1][1]

        unet, unet_note = unet_net(shape, workdir)
        unet.blobs["data"].data[...] = images
        unet.blobs["label"].data[...] = labels

        def forward_backward():
            unet.forward()
            unet.backward()

        unet_ms = median_ms(forward_backward, args.unet_repeats, warmup=1)
        rows.append(("U-Net forward+backward", unet_ms))

    width = max(len(name) for name, _ in rows)
    print(f"\n{'name':<{width}}  {'ms/batch':>9}  {'÷ layer':>8}")
    for name, ms in rows:
        reference = hed_ms if "hed" in name and "stain_stats" not in name else layer_ms
        print(f"{name:<{width}}  {ms:9.2f}  {ms / reference:8.2f}")
    print(f"\nU-Net: {unet_note}")
    print(f"albumentations: {album_note}")
    print(f"layer (rotate+flip+color) / U-Net fwd+bwd: {100 * layer_ms / unet_ms:.2f} % (goal <= 5 %)")
    print(f"layer (+hed)              / U-Net fwd+bwd: {100 * hed_ms / unet_ms:.2f} %")
    for space, name in STATS_ROWS.items():
        ms = dict(rows)[name]
        print(f"stain_stats ({space}) colour path: {ms / hed_ms:.2f}x today's colour path (rotate+flip+color+hed; "
              f"goal <= 2x), {ms / layer_ms:.2f}x rotate+flip+color; {100 * ms / unet_ms:.2f} % of the U-Net")
    naive_ms = dict(rows)["naive_augment (per image)"]
    plain_ms = dict(rows)["plain per-image numpy loop"]
    print(f"naive_augment / layer: {naive_ms / layer_ms:.2f}x, plain loop / layer: {plain_ms / layer_ms:.2f}x "
          "(goal >= 3x)")
    if album is not None:
        print(f"albumentations / layer: {dict(rows)['albumentations (per image)'] / layer_ms:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
