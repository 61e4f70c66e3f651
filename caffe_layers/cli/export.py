"""``caffe-stain-export``: a deploy net and its weights as ONNX (fp32, or static int8), checked against its source."""
import argparse
import json
import sys
from pathlib import Path

from ..image_io import read_rgb, same_file, write_atomic
from . import UsageError, run

__all__ = ["main"]


def _write(path, data, overwrite):
    write_atomic(path, lambda tmp: Path(tmp).write_bytes(data), overwrite=overwrite)


def main(argv=None):
    """Convert, check and write; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="caffe-stain-export",
        description="Convert a Caffe deploy net and its weights to ONNX with the project's own converter, "
                    "check it against Caffe on a probe tile (max |Δp| printed), and optionally quantise it to "
                    "static int8 (per-channel QDQ) calibrated on your images, reporting the probability "
                    "difference and mask Dice against fp32 on them. Run the result with --engine onnxruntime "
                    "--onnx-model FILE (auto never picks an int8 model).")
    parser.add_argument("--model", required=True, help="deploy prototxt")
    parser.add_argument("--weights", required=True, help=".caffemodel")
    parser.add_argument("--out", required=True, help="output .onnx file")
    parser.add_argument("--onnx", action="store_true", help="write the fp32 ONNX model (the default)")
    parser.add_argument("--int8", action="store_true", help="write a static int8 model instead (needs --calibrate)")
    parser.add_argument("--calibrate", nargs="+", metavar="IMAGE", help="RGB images for the int8 calibration")
    parser.add_argument("--output-blob", default="prob", help="blob the model returns (default prob)")
    parser.add_argument("--probe", type=int, default=256, help="side of the probe tile checked against Caffe")
    parser.add_argument("--tile", type=int, default=256, help="int8 report: tile side (default 256)")
    parser.add_argument("--multiple", type=int, default=4, help="int8 report: net input multiple (default 4)")
    parser.add_argument("--json", help="also write the report as JSON here")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    args = parser.parse_args(argv)

    def body():
        out = Path(args.out)
        if out.suffix.lower() != ".onnx":
            raise UsageError(f"--out {out}: the output must be a .onnx file")
        if args.int8 and not args.calibrate:
            raise UsageError("--int8 needs --calibrate IMAGE ...")
        if args.calibrate and not args.int8:
            raise UsageError("--calibrate is for --int8")
        if not 16 <= args.probe <= 4096:
            raise UsageError(f"--probe must be in [16, 4096]; got {args.probe}")
        inputs = [args.model, args.weights] + (args.calibrate or [])
        for path in inputs:
            if not Path(path).is_file():
                raise UsageError(f"{path}: no such file")
        outputs = [out] + ([Path(args.json)] if args.json else [])
        for output in outputs:
            for path in inputs:
                if same_file(path, output):
                    raise UsageError(f"{output}: would replace the input {path}")
        if args.json and same_file(out, args.json):
            raise UsageError(f"--json {args.json}: the same file as --out")
        if out.exists() and not args.overwrite:
            raise UsageError(f"{out}: already exists (use --overwrite to replace it)")
        images = [read_rgb(path) for path in args.calibrate or []]
        from ..net.inference.caffe_engine import use_cpu
        from ..net.inference.onnx_check import calibration_tiles, check_against_caffe, compare_models, quantize_int8
        from ..net.inference.onnx_export import caffe_to_onnx
        from ..net.inference.receptive_field import net_receptive_radius

        use_cpu()
        fp32 = caffe_to_onnx(args.model, args.weights, output_blob=args.output_blob).SerializeToString()
        max_diff = check_against_caffe(args.model, args.weights, fp32, side=args.probe)
        report = {"model": args.model, "weights": args.weights, "output": str(out), "kind": "fp32",
                  "probe": [1, 3, args.probe, args.probe], "max_abs_diff_vs_caffe": max_diff}
        print(f"caffe-stain-export: fp32 ONNX matches Caffe on a 1×3×{args.probe}×{args.probe} probe tile: "
              f"max |Δp| {max_diff:.1e}")
        data = fp32
        if args.int8:
            radius = net_receptive_radius(args.model)
            overlap = 2 * radius if radius is not None and 2 * radius < args.tile else min(64, args.tile - 1)
            data = quantize_int8(fp32, calibration_tiles(images, args.tile))
            rows = compare_models(fp32, data, images, args.tile, overlap, args.multiple)
            for path, row in zip(args.calibrate, rows):
                row["image"] = path
                print(f"caffe-stain-export: int8 vs fp32 on {path}: max |Δp| {row['max_abs_diff']:.3f}, mean "
                      f"{row['mean_abs_diff']:.4f}, mask Dice {row['mask_dice']:.4f}")
            report.update(kind="int8", quantisation="static, QDQ, int8 weights per channel, int8 activations",
                          calibration=rows,
                          min_mask_dice=min(row["mask_dice"] for row in rows))
        _write(out, data, args.overwrite)
        if args.json:
            write_atomic(args.json, lambda tmp: Path(tmp).write_text(json.dumps(report, indent=1) + "\n"),
                         overwrite=args.overwrite)
        print(f"caffe-stain-export: wrote {out} ({report['kind']})")

    return run(parser.prog, body)


if __name__ == "__main__":
    sys.exit(main())
