"""Command line of the converters.

    python -m megatron_evomoe.convert hf-to-evomoe --src HF_DIR --dst RUN_DIR
        [--vision-src CLIP_OR_SIGLIP_DIR] [--tokenizer DIR] [--vision-feature-layer N]
        [--max-seq-len N] [--dtype auto|float32|bfloat16|float16] [--projector mlp2x_gelu|linear]
        [--seed S] [--force]
    python -m megatron_evomoe.convert evomoe-to-hf --src RUN_OR_CKPT --dst HF_DIR
        [--format auto|llama|qwen2|mixtral|qwen2_moe|phi|stablelm|llava|evomoe] [--llm-only]
        [--dtype ...] [--max-shard-size BYTES] [--force]

Exit status 2 with a one-line message for a conversion error (unsupported architecture,
missing tensor, shape mismatch, bad destination).
"""
from __future__ import annotations

import argparse
import logging
import sys

from ..cli import USER_ERRORS, ArgumentParser, int_at_least, user_error
from .errors import ConversionError


def _size(text: str) -> int:
    """argparse type of --max-shard-size: bytes, or a number with a unit (5GB, 500MiB); at least 1 byte."""
    units = {"KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "B": 1}
    t = text.strip().upper()
    unit = next((u for u in units if t.endswith(u)), None)
    try:
        size = float(t[: -len(unit)]) * units[unit] if unit else float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected bytes or a size such as 5GB or 500MiB, got {text!r}") from None
    if not size >= 1 or size == float("inf"):  # nan compares False
        raise argparse.ArgumentTypeError(f"must be at least 1 byte, got {text!r}")
    return int(size)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m megatron_evomoe.convert", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("hf-to-evomoe", help="Hugging Face folder -> run folder of this project")
    imp.add_argument("--src", required=True, help="HF model folder (config.json + safetensors)")
    imp.add_argument("--dst", required=True, help="run folder to write (checkpoints/00-imported, tokenizer/)")
    imp.add_argument("--vision-src", default=None, help="CLIP/SigLIP folder to attach to an LLM --src")
    imp.add_argument("--tokenizer", default=None, help="tokenizer folder to use instead of the one in --src")
    imp.add_argument("--vision-feature-layer", type=int, default=None,
                     help="vision hidden state the projector reads (default: LLaVA config's, else -2)")
    imp.add_argument("--max-seq-len", type=int_at_least(1), default=None, help="cap model.max_seq_len")
    imp.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    imp.add_argument("--projector", default="mlp2x_gelu", choices=("mlp2x_gelu", "linear"),
                     help="projector created for --vision-src")
    imp.add_argument("--seed", type=int_at_least(0, 2 ** 64), default=0, help="seed of a freshly initialised projector")
    imp.add_argument("--force", action="store_true", help="write into a non-empty --dst")
    exp = sub.add_parser("evomoe-to-hf", help="checkpoint of this project -> Hugging Face folder")
    exp.add_argument("--src", required=True, help="run folder (latest checkpoint) or checkpoint folder")
    exp.add_argument("--dst", required=True, help="folder to write")
    exp.add_argument("--format", default="auto",
                     choices=("auto", "llama", "qwen2", "mixtral", "qwen2_moe", "phi", "stablelm", "llava",
                              "evomoe"))
    exp.add_argument("--llm-only", action="store_true", help="export the decoder of a multimodal model alone")
    exp.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    exp.add_argument("--max-shard-size", type=_size, default=5 * 10 ** 9, help="bytes per safetensors shard (e.g. 5GB)")
    exp.add_argument("--force", action="store_true", help="write into a non-empty --dst")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        if args.command == "hf-to-evomoe":
            from .llava import hf_to_evomoe
            hf_to_evomoe(args.src, args.dst, vision_src=args.vision_src, tokenizer=args.tokenizer,
                         feature_layer=args.vision_feature_layer, max_seq_len=args.max_seq_len, dtype=args.dtype,
                         projector=args.projector, seed=args.seed, force=args.force)
        else:
            from .export import evomoe_to_hf
            evomoe_to_hf(args.src, args.dst, args.format, llm_only=args.llm_only, dtype=args.dtype,
                         max_shard_size=args.max_shard_size, force=args.force)
    except ConversionError as e:
        return user_error(e, "conversion error")
    except USER_ERRORS as e:  # a bad --src checkpoint, config or tokenizer
        return user_error(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
