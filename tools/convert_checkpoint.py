#!/usr/bin/env python3
"""Convert an official BEVFusion checkpoint (spconv-1 or spconv-2 sparse-conv layout) to ours.

The config builds the model, which tells which weights are sparse convolutions; the converted
weights are loaded into it (strictly unless --non-strict) before the file is written, so a
checkpoint that does not fit the config fails here with the list of mismatched keys.

    tools/convert_checkpoint.py CONFIG bevfusion-det.pth converted.pth
"""
from __future__ import annotations

import sys

import torch

from bevfusion.utils.cli import config_parser, parse_config_args
from bevfusion.utils.io import atomic_writer
from bevfusion.utils.logging import get_logger

log = get_logger("convert_checkpoint")


def main(argv: list[str] | None = None) -> int:
    parser = config_parser(__doc__)
    parser.add_argument("input", help="official checkpoint (.pth)")
    parser.add_argument("output", help="converted checkpoint to write")
    parser.add_argument("--non-strict", action="store_true",
                        help="write even if keys are missing or unexpected (they are listed)")
    args, cfg = parse_config_args(parser, argv)

    from bevfusion.models import build_model
    from bevfusion.models.convert import load_converted, read_checkpoint

    try:
        ckpt = read_checkpoint(args.input)
        model = build_model(cfg.model)
        report = load_converted(model, ckpt["state_dict"], strict=not args.non_strict)
    except (FileNotFoundError, KeyError, ValueError) as exc:
        log.error("%s", exc)
        return 1
    log.info("%s: %s", args.input, report)
    meta = {k: v for k, v in (ckpt.get("meta") or {}).items() if isinstance(v, (str, int, float))}
    meta["converted_from"] = str(args.input)
    atomic_writer(args.output, lambda f: torch.save({"state_dict": model.state_dict(), "meta": meta}, f))
    log.info("wrote %s", args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
