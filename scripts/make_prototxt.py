#!/usr/bin/env python
"""Write (or check) every file in prototxt/ from caffe_layers.net.training.templates.default_templates.

The generated nets use depth 2, base width 16, 96-pixel patches, batch 8, the list files
data/train_list.txt and data/val_list.txt and the mean file data/mean.binaryproto; the
solvers point at prototxt/unet_patchmean_train_val.prototxt and snapshot to
snapshots/. All those paths are relative to the directory caffe (or caffe-stain-train) runs
in, i.e. the repository root.

    python scripts/make_prototxt.py            # rewrite prototxt/
    python scripts/make_prototxt.py --check    # exit 1 listing files that are out of date
"""
import argparse
import os
import sys
from pathlib import Path

# Caffe's glog would print a page per net; must be set before caffe is imported.
os.environ.setdefault("GLOG_minloglevel", "2")

REPO_ROOT = Path(__file__).resolve().parents[1]


def stale_files(out_dir, templates):
    """Names of the templates whose file in ``out_dir`` is missing or differs, and of the
    ``*.prototxt`` files there that the generator no longer writes."""
    stale = [name for name, text in templates.items()
             if not (out_dir / name).is_file() or (out_dir / name).read_text() != text]
    return stale + sorted(path.name for path in out_dir.glob("*.prototxt") if path.name not in templates)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "prototxt",
                        help="output directory (default: the repository's prototxt/)")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if any file differs from what would be generated")
    args = parser.parse_args(argv)

    from caffe_layers.net.training.templates import default_templates

    templates = default_templates()
    if args.check:
        stale = stale_files(args.out, templates)
        for name in stale:
            state = "not generated any more" if name not in templates else "out of date"
            print(f"{state}: {args.out / name}", file=sys.stderr)
        if stale:
            print("run: python scripts/make_prototxt.py", file=sys.stderr)
            return 1
        print(f"{len(templates)} files in {args.out} are up to date")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name in stale_files(args.out, templates):
        if name not in templates:
            (args.out / name).unlink()
            print(f"removed {args.out / name} (not generated any more)")
    for name, text in templates.items():
        (args.out / name).write_text(text)
        print(f"wrote {args.out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
