#!/usr/bin/env python3
"""Convert an official BEVFusion checkpoint (spconv-1 or spconv-2 sparse-conv layout) to ours.

The config builds the model, which tells which weights are sparse convolutions; the converted
weights are loaded into it (strictly unless --non-strict) before the file is written, so a
checkpoint that does not fit the config fails here with the list of mismatched keys.

    tools/convert_checkpoint.py CONFIG bevfusion-det.pth converted.pth

The output is weights only: it is never written over the input (nor the config), and an existing
output file is replaced only with --force.
"""
from __future__ import annotations

import sys

import torch

from bevfusion.utils.cli import config_parser, parse_config_args, tool_main
from bevfusion.utils.io import atomic_writer, check_writable_output
from bevfusion.utils.logging import get_logger

log = get_logger("convert_checkpoint")


@tool_main
def main(argv: list[str] | None = None) -> int:
    parser = config_parser(__doc__)
    parser.add_argument("input", help="official checkpoint (.pth)")
    parser.add_argument("output", help="converted checkpoint to write (never the input)")
    parser.add_argument("--non-strict", action="store_true",
                        help="write even if keys are missing or unexpected (they are listed)")
    parser.add_argument("--force", action="store_true", help="replace an existing output file")
    args, cfg = parse_config_args(parser, argv)
    # never over an input (even with --force); an existing file is refused below, once the input is known good
    check_writable_output(args.output, option="output", kind="converted checkpoint",
                          inputs=[args.input, args.config], force=True)

    from bevfusion.engine.checkpoint import check_finite
    from bevfusion.models import build_model
    from bevfusion.models.convert import load_converted, read_checkpoint

    ckpt = read_checkpoint(args.input)
    check_finite(ckpt["state_dict"], args.input)
    model = build_model(cfg.model, init_weights=args.non_strict)  # strict: the checkpoint sets every weight
    try:
        report = load_converted(model, ckpt["state_dict"], strict=not args.non_strict)
    except KeyError as exc:  # the key lists: name the file they come from
        raise KeyError(f"{args.input}: {exc.args[0]}") from None
    except ValueError as exc:  # a weight that cannot be converted: its key is named
        raise ValueError(f"{args.input}: {exc}") from None
    log.info("%s: %s", args.input, report)
    check_writable_output(args.output, option="output", kind="converted checkpoint",
                          inputs=[args.input, args.config], force=args.force)
    meta = {k: v for k, v in (ckpt.get("meta") or {}).items() if isinstance(v, (str, int, float))}
    meta["converted_from"] = str(args.input)
    atomic_writer(args.output, lambda f: torch.save({"state_dict": model.state_dict(), "meta": meta}, f))
    log.info("wrote %s", args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
