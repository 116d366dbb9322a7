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
from typing import List, Optional, Sequence, Tuple

from ..cli import USER_ERRORS, ArgumentParser, user_error
from ..config import Config, ConfigError, load_config
from .build_bundled import build_bundled_dataset
from .conversation_templates import stage_template
from .image_processing import ImageProcessor
from .llava_dataset import LlavaDataset
from .tokenizer import Tokenizer, load_tokenizer


def stage_files(stage) -> List[Tuple[str, float]]:
    """(file under data.root, weight) of each component of a stage's data: one file has weight 1 (the
    config's validation has checked a mixture's entries)."""
    if isinstance(stage.data, str):
        return [(stage.data, 1.0)]
    return [(item["path"], float(item["weight"])) for item in stage.data]


def stage_data_field(stage, i: int) -> str:
    """The config field that names component i of a stage's data, for error messages."""
    return f"stages.{stage.name}.data" + ("" if isinstance(stage.data, str) else f"[{i}].path")


def index_dir_of(cfg: Config) -> Path:
    """data.index_dir, or <data.root>/.token_index."""
    return Path(cfg.data.index_dir) if cfg.data.index_dir else Path(cfg.data.root) / ".token_index"


def data_root_and_tokenizer(cfg: Config, log=None) -> Tuple[Path, Tokenizer]:
    """data.root (the bundled dataset built there first if asked and missing) and the tokenizer."""
    d = cfg.data
    root = Path(d.root)
    if d.build_if_missing:
        build_bundled_dataset(str(root), num_images=d.num_images, num_test_images=d.num_test_images,
                              image_size=cfg.vision.image_size, seed=cfg.train.seed, log=log)
    elif not root.is_dir():
        raise ConfigError(f"data.root: folder not found: {root} (set data.build_if_missing=true to build it)")
    return root, load_tokenizer(d.tokenizer or str(root / "tokenizer"))


def open_stage_dataset(root: Path, tokenizer: Tokenizer, name: str, where: str, cfg: Config,
                       template) -> LlavaDataset:
    """The dataset of one stage file (under `root`) in the stage's conversation template, its token index
    built or reused; `where` is the config field naming the file."""
    path = root / name
    if not path.is_file():
        raise ConfigError(f"{where}: file not found: {path}")
    return LlavaDataset(path, root / "images", tokenizer, cfg.data.seq_len, cfg.vision.num_image_tokens,
                        ImageProcessor.from_config(cfg.vision), skip_bad_samples=cfg.data.skip_bad_samples, template=template,
                        overlong=cfg.data.overlong, index_dir=index_dir_of(cfg))


def prepare(cfg: Config, out=None) -> List[LlavaDataset]:
    """Open or build the index of every distinct stage file; one line per file on `out` (stdout)."""
    out = out or sys.stdout  # (read now: a default bound at import would keep a replaced stdout)
    root, tokenizer = data_root_and_tokenizer(cfg)
    fields = {}  # each distinct (file, template) once, named by the first field that lists it
    for idx, stage in enumerate(cfg.stages):
        template = stage_template(cfg, idx, tokenizer)
        for i, (name, _) in enumerate(stage_files(stage)):
            fields.setdefault((name, template.name), (stage_data_field(stage, i), template))
    datasets = []
    for (name, _), (where, template) in fields.items():
        t0 = time.perf_counter()
        ds = open_stage_dataset(root, tokenizer, name, where, cfg, template)
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
