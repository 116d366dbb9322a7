"""`python -m megatron_evomoe.data.prepare CONFIG [--section.field=value ...]`: build (or confirm) the
token index of every stage file of a config before a run, and say what is in it.

Per file one line: records, kept, skipped by reason, truncated, text tokens, index bytes and bytes per
text token, wall time, whether it was built or reused, and the index folder.  The run itself then
opens these indexes in seconds on every rank.  A user error (a bad config, a bad record) is one line
on stderr and exit status 2, as every CLI of the project.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

from ..cli import USER_ERRORS, ArgumentParser, user_error
from ..config import Config, ConfigError, load_config
from .build_bundled import build_bundled_dataset
from .llava_dataset import LlavaDataset
from .tokenizer import load_tokenizer


def stage_data_files(stage) -> List[str]:
    """The data files of a stage: `data` is one file, or a mixture [{path, weight}, ...] (or [path, ...])."""
    data = stage.data
    if isinstance(data, str):
        return [data]
    files = []
    for k, item in enumerate(data):
        path = item.get("path") if isinstance(item, dict) else item
        if not isinstance(path, str) or not path:
            raise ConfigError(f"stages.{stage.name}.data[{k}]: expected a file name or {{path, weight}}, got {item!r}")
        files.append(path)
    return files


def index_dir_of(cfg: Config) -> Path:
    """data.index_dir, or <data.root>/.token_index."""
    return Path(cfg.data.index_dir) if cfg.data.index_dir else Path(cfg.data.root) / ".token_index"


def prepare(cfg: Config, out=sys.stdout) -> List[LlavaDataset]:
    """Open or build the index of every distinct stage file; one line per file on `out`."""
    root = Path(cfg.data.root)
    if cfg.data.build_if_missing:
        build_bundled_dataset(str(root), num_images=cfg.data.num_images, num_test_images=cfg.data.num_test_images,
                              image_size=cfg.vision.image_size, seed=cfg.train.seed)
    elif not root.is_dir():
        raise ConfigError(f"data.root: folder not found: {root} (set data.build_if_missing=true to build it)")
    tokenizer = load_tokenizer(cfg.data.tokenizer or str(root / "tokenizer"))
    files = list(dict.fromkeys(f for stage in cfg.stages for f in stage_data_files(stage)))
    datasets = []
    for name in files:
        path = root / name
        if not path.is_file():
            raise ConfigError(f"stages: data file not found: {path}")
        t0 = time.perf_counter()
        ds = LlavaDataset(path, root / "images", tokenizer, cfg.data.seq_len, cfg.vision.num_image_tokens,
                          cfg.vision.image_size, skip_bad_samples=cfg.data.skip_bad_samples,
                          overlong=cfg.data.overlong, index_dir=index_dir_of(cfg))
        print(describe(ds, time.perf_counter() - t0), file=out, flush=True)
        datasets.append(ds)
    return datasets


def describe(ds: LlavaDataset, seconds: float) -> str:
    index = ds.index
    m = index.manifest
    skipped = ", ".join(f"{k}={v}" for k, v in m["skipped"].items()) or "none"
    num_bytes = index.file_bytes()
    per_token = num_bytes / m["num_text_tokens"] if m["num_text_tokens"] else float("nan")
    return (f"{ds.json_path}: {m['num_records']} records, {m['num_kept']} kept, skipped: {skipped}, "
            f"truncated: {m['num_truncated']}, {m['num_text_tokens']} text tokens, {num_bytes} bytes "
            f"({per_token:.2f} per text token), {seconds:.1f} s, {'built' if index.built else 'reused'}: "
            f"{index.folder}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = ArgumentParser(prog="python -m megatron_evomoe.data.prepare",
                            description="Build (or confirm) the token index of every stage file of a config.")
    parser.add_argument("config", help="YAML config file of the run")
    args, overrides = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    bad = [o for o in overrides if not (o.startswith("--") and "=" in o)]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)} (overrides are --section.field=value)")
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        return user_error(e, "config error")
    try:
        prepare(cfg)
    except USER_ERRORS as e:
        return user_error(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
