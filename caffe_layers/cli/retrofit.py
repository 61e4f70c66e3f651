"""``caffe-stain-retrofit``: put the AugmentationLayer into an existing train_val prototxt.

    caffe-stain-retrofit train_val.prototxt --out train_val_aug.prototxt \\
        --param-str '{"color": True, "color_a_min": 0.74, "color_a_max": 1.45}' \\
        [--centring keep|patchmean] [--deploy deploy.prototxt --deploy-out deploy_aug.prototxt]

See :mod:`caffe_layers.net.retrofit` for what is rewritten and why.
"""
import argparse
import sys

from . import UsageError, pycaffe_status, run

__all__ = ["main"]

#: caffe_layers.net.retrofit.CENTRINGS and .LABEL_KINDS, repeated so that --help needs no Caffe.
CENTRINGS = ("keep", "patchmean")
LABEL_KINDS = ("auto", "spatial", "scalar")


def main(argv=None):
    """Rewrite the net and print what changed; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="caffe-stain-retrofit",
        description="Rewrite a Caffe train_val net (V0, V1 or V2 prototxt) to train with the AugmentationLayer: "
                    "inserted after the TRAIN data layer(s), in place, TRAIN phase only; the data layer's mean and "
                    "scale moved after it (the augmentation must see raw stain intensities), with the same TEST "
                    "output; an existing augmentation layer replaced. Writes V2 prototxt; prints every change.")
    parser.add_argument("net", metavar="IN.prototxt", help="the train_val net to rewrite (never modified)")
    parser.add_argument("--param-str", metavar="STR",
                        help="augmentation parameters: the line caffe-stain-estimate prints (a Python-literal dict), "
                             "JSON or YAML, or @FILE to read them from a file (also caffe-stain-estimate --json "
                             "output). Optional when the net already has an augmentation layer, whose param_str is "
                             "carried over (keys given here win)")
    parser.add_argument("--out", required=True, metavar="OUT.prototxt", help="the rewritten train_val net")
    parser.add_argument("--centring", choices=CENTRINGS, default="keep",
                        help="keep: subtract the data layer's mean (file or values) after the augmentation, so the "
                             "TEST output is unchanged (default); patchmean: centre each patch on its own "
                             "per-channel mean (MVN) instead, in the train and the deploy net, no mean file needed")
    parser.add_argument("--deploy", metavar="DEPLOY.prototxt", help="the deploy net (with --deploy-out)")
    parser.add_argument("--deploy-out", metavar="OUT_DEPLOY.prototxt",
                        help="the rewritten deploy net: with --centring patchmean it centres its input itself; with "
                             "keep it is only upgraded to V2")
    parser.add_argument("--input-range", type=int, choices=(255, 1), default=None,
                        help="white of the raw data blob: 255 (Data/ImageData layers always are) or 1 (e.g. "
                             "HDF5 data in 0-1: color_b_*, clip_* and max_value, given in 0-255 grey levels as "
                             "caffe-stain-estimate prints them, are divided by 255). Default: 255, or 1 when the "
                             "TRAIN data of a Python/HDF5 data layer, run once, is in 0-1")
    parser.add_argument("--input-mean", metavar="M[,M,M]",
                        help="the data layer already delivers (raw - M) * S (raw in 0-255, M per channel in the "
                             "layer's channel order): the AugmentationLayer is wrapped in layers undoing and redoing "
                             "that, instead of clipping normalised data (with --input-scale, default 1)")
    parser.add_argument("--input-scale", metavar="S", type=float, default=None,
                        help="the scale S of --input-mean (e.g. 0.00392156862745098 for x/255 - 0.5 with M 127.5)")
    parser.add_argument("--label", choices=LABEL_KINDS, default="auto",
                        help="whether the label is a per-pixel map (augmented with the image) or a class label "
                             "(left alone); auto decides from the prototxt and refuses when it cannot (default)")
    parser.add_argument("--image-top", metavar="NAME", help="the data top to augment, when the names do not tell")
    parser.add_argument("--label-top", metavar="NAME",
                        help="the label top, when the names do not tell ('' for none)")
    parser.add_argument("--drop-unknown-keys", action="store_true",
                        help="drop keys of a carried-over param_str that the AugmentationLayer does not know (listed) "
                             "instead of refusing")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files (never the inputs)")
    args = parser.parse_args(argv)
    if pycaffe_status(parser.prog):  # the rewritten net is checked by building it
        return 2
    from ..net.retrofit import retrofit_files

    def body():
        if (args.deploy is None) != (args.deploy_out is None):
            raise UsageError("--deploy and --deploy-out go together")
        normalisation = _normalisation(args.input_mean, args.input_scale)
        result = retrofit_files(args.net, args.out, args.param_str, centring=args.centring,
                                input_range=args.input_range, label=args.label, image_top=args.image_top,
                                label_top=args.label_top, deploy=args.deploy, deploy_out=args.deploy_out,
                                overwrite=args.overwrite, drop_unknown_keys=args.drop_unknown_keys,
                                input_normalisation=normalisation)
        print(f"{args.net} -> {args.out}" + (f"; {args.deploy} -> {args.deploy_out}" if args.deploy else ""))
        for line in result.lines:
            print(line)
        print(f"wrote {args.out}" + (f" and {args.deploy_out}" if args.deploy_out else "")
              + f"; point your solver's net: at {args.out} (your .caffemodel loads into it as it is)")

    return run(parser.prog, body)


def _normalisation(mean_text, scale):
    """(mean tuple, scale) from --input-mean/--input-scale, or None."""
    if mean_text is None:
        if scale is not None:
            raise UsageError("--input-scale goes with --input-mean (give --input-mean 0 for a scale alone)")
        return None
    try:
        mean = tuple(float(part) for part in mean_text.split(","))
    except ValueError:
        raise UsageError(f"--input-mean must be 1 or 3 numbers separated by commas; got {mean_text!r}") from None
    return mean, 1.0 if scale is None else scale


if __name__ == "__main__":
    sys.exit(main())
