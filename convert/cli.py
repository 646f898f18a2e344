"""Command line of `jaxvlm-convert` (also `python -m convert` and `jaxvlm convert`)."""

from __future__ import annotations

import argparse
import os
import sys

DTYPE_CHOICES = ("bfloat16", "float16", "float32")


def build_parser(prog: str = "jaxvlm-convert") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Convert a llava-hf or original LLaVA checkpoint into a jaxvlm checkpoint (Orbax) that "
        "jaxvlm.pipeline(DST) loads.",
    )
    p.add_argument("src", metavar="SRC", help="checkpoint directory or hub id (e.g. llava-hf/llava-1.5-7b-hf)")
    p.add_argument("dst", metavar="DST", help="directory to write; must not exist or be empty (see --overwrite)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default=None,
                   help="dtype of the stored weights (default: the source checkpoint's own dtype)")
    p.add_argument("--vision-tower", metavar="PATH", default=None,
                   help="original LLaVA checkpoints: local CLIP directory to use instead of mm_vision_tower")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists and is not empty")
    p.add_argument("--revision", default=None, help="hub revision of SRC")
    p.add_argument("--download-dir", default=None, help="hub cache directory to download SRC into")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None, prog: str = "jaxvlm-convert") -> int:
    """Runs the converter; returns the process exit status (0 on success, 1 on a refused or failed conversion)."""
    args = build_parser(prog).parse_args(argv)
    # Conversion needs no accelerator: keep JAX off the GPU/TPU of a fresh process (no effect if already set up).
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from convert import convert_checkpoint

    try:
        dst = convert_checkpoint(args.src, args.dst, args.dtype, vision_tower_path=args.vision_tower,
                                 overwrite=args.overwrite, revision=args.revision, download_dir=args.download_dir,
                                 progress=not args.quiet)
    except (ValueError, OSError) as e:  # ConvertError, ConfigError and CheckpointError are ValueErrors
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; nothing was written to {args.dst}", file=sys.stderr)
        return 130
    if not args.quiet:
        print(f"wrote {dst}", file=sys.stderr)
    return 0
