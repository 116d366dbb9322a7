#!/usr/bin/env python
"""The data path at LLaVA scale, side by side with today's (commit b400fdc): start-up, index size,
loader throughput against the demo's training step, padding with and without packing.

    python benchmarks/data_pipeline.py                          # 665,000 records (the lead's run)
    python benchmarks/data_pipeline.py --records 20000 --json-out /tmp/data_pipeline.json

It writes a synthetic LLaVA-mix (synthetic_llava_mix.py) under --work-dir and measures:
(a) cold start-up, one rank: building `LlavaDataset` with an empty `index_dir` (the token index is
    built), wall time and peak RSS (`ru_maxrss` at the end), each in a fresh process. Today's path
    is the package of commit b400fdc (`git archive` into the work dir, imported from there): it
    parses and tokenises the whole file into int64 arrays (issue 13 measured 19.3 GiB at 665k records
    with its word tokenizer), so it runs on the first --legacy-records records (default a tenth; a
    prefix of the same file); its row at N records is a linear extrapolation, labelled as such;
(b) warm start-up: the same with the index already there;
(c) the index's size on disk and bytes per text token (image slots are not tokens on disk);
(d) loader samples/s (`MicroBatchLoader`, 0/2/4 workers) over the index dataset at the demo's geometry
    (examples/configs/tiny_cpu.yaml: 32 x 32 images, 16 image tokens, seq_len 96, micro-batch 32), and
    the samples/s one training step of the demo consumes (its model with the structure of its stage I,
    the median of a few steps after warm-up: 32 / step time); the ratio is the issue's target (>= 3x
    with 2 workers);
(e) padding at seq_len 2048 on the full mix: one record per row, and `pack_rows` over windows of
    --window samples of a shuffled stream, as the trainer packs.
Every start-up is checked against the records written (samples and tokens); the loader rows and the
training step run in one further fresh process. A last table puts each of issue 13's targets beside its
figure. A piece of issue 13 that is not in this tree yet (the token index, worker processes, packing)
gives a row "not available: <why>" instead of figures. The work dir is deleted at the end unless --keep.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import synthetic_llava_mix as mix  # noqa: E402  (benchmarks/ is not a package)
from common import print_table  # noqa: E402

LEGACY_COMMIT = "b400fdc"
DEMO_CONFIG = ROOT / "examples" / "configs" / "tiny_cpu.yaml"
LLAVA_IMAGE_SIZE = 336  # LLaVA-1.5's CLIP ViT-L/14-336: 576 image tokens
DEMO_IMAGE_SIDES = (32, 64)  # the demo-geometry mix's pool: the size of the demo's scenes (32 x 32) and a little larger
LLAVA_IMAGE_SIDES = (224, 640)  # COCO-like photos
MIB = 2**20


# --------------------------------------------------------------------------- measurements (fresh processes)

def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _open_dataset(spec: dict):
    """LlavaDataset of spec's file; index_dir only when given (today's path has none)."""
    from megatron_evomoe.data.llava_dataset import LlavaDataset
    from megatron_evomoe.data.tokenizer import load_tokenizer
    kwargs = {"index_dir": spec["index_dir"]} if spec.get("index_dir") else {}
    return LlavaDataset(spec["json"], spec["image_root"], load_tokenizer(spec["tokenizer"]), spec["seq_len"],
                        spec["num_image_tokens"], spec["image_size"], **kwargs)


def worker_startup(spec: dict) -> dict:
    """Build (cold) or open (warm) the dataset: wall time from the tokenizer's load to a usable dataset."""
    import megatron_evomoe
    import megatron_evomoe.data.llava_dataset  # noqa: F401  (imports, torch included, are not start-up)
    base = _peak_rss()
    t0 = time.perf_counter()
    ds = _open_dataset(spec)
    num_tokens = int(np.asarray(ds.lengths).sum(dtype=np.int64))
    return {"wall_s": time.perf_counter() - t0, "peak_rss": _peak_rss(), "base_rss": base, "num_samples": len(ds),
            "num_tokens": num_tokens, "package": megatron_evomoe.__file__}


class LoaderCollate:
    """Unpacked rows -> the dataset's batch, plus the id of the process that collated it (which tells
    whether the loader really ran worker processes)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __call__(self, rows):
        import torch
        batch = self.dataset.collate([sample for row in rows for sample in row])
        batch["loader_pid"] = torch.tensor([os.getpid()])
        return batch


def _plans(num_samples: int, micro_batch: int, num_batches: int, seed: int) -> list:
    from megatron_evomoe.data.loader import MicroBatchPlan
    order = np.random.default_rng(seed).permutation(num_samples)
    order = np.resize(order, micro_batch * num_batches)  # wraps around a small file
    return [MicroBatchPlan([[int(i)] for i in order[b * micro_batch:(b + 1) * micro_batch]], {"batches": b + 1})
            for b in range(num_batches)]


def measure_loader(ds, spec: dict, num_workers: int) -> dict:
    """Samples/s of MicroBatchLoader with num_workers, after its first batch (worker start-up apart)."""
    from megatron_evomoe.data.loader import MicroBatchLoader
    plans = _plans(len(ds), spec["micro_batch"], spec["batches"] + 1, spec["seed"])
    loader = MicroBatchLoader(plans, ds.__getitem__, LoaderCollate(ds), num_workers=num_workers,
                              prefetch_factor=2, pin_memory=False)
    t0 = time.perf_counter()
    it = iter(loader)
    _, batch, _ = next(it)
    pids = {int(batch["loader_pid"])}
    t1 = time.perf_counter()
    for _, batch, _ in it:
        pids.add(int(batch["loader_pid"]))
    t2 = time.perf_counter()
    loader.close()
    return {"samples_per_s": spec["batches"] * spec["micro_batch"] / (t2 - t1), "first_batch_s": t1 - t0,
            "in_workers": os.getpid() not in pids}


def measure_train(ds, spec: dict) -> dict:
    """Median time of one demo training step (micro-batch of the config, stage I's structure and trainable set)."""
    import torch
    from megatron_evomoe.config import load_config, stage_global_batch
    from megatron_evomoe.data.conversation import IGNORE_INDEX
    from megatron_evomoe.stages.structure import build_model
    from megatron_evomoe.stages.trainable import set_trainable
    from megatron_evomoe.training.cpu_allocator import use_caching_allocator
    from megatron_evomoe.training.optim import build_optimizer
    cfg = load_config(str(DEMO_CONFIG))
    cfg.model.vocab_size = cfg.model.vocab_size or ds.tokenizer.vocab_size  # as training/data_setup.py does
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    use_caching_allocator()  # what the trainer does on CPU (train.cpu_allocator: caching)
    torch.manual_seed(cfg.train.seed)
    idx = [s.name for s in cfg.stages].index(spec["stage"])
    stage = cfg.stages[idx]
    model = build_model(cfg, ds.tokenizer.image_token_id, up_to_stage=idx).train()
    set_trainable(model, cfg, stage, idx)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = build_optimizer(params, stage.lr, cfg.train.weight_decay, tuple(cfg.train.adam_betas), torch.device("cpu"))
    micro = cfg.train.micro_batch_size
    plans = _plans(len(ds), micro, spec["warmup"] + spec["steps"], spec["seed"])
    times = []
    for plan in plans:
        batch = ds.collate([ds[row[0]] for row in plan.rows])
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.train.bf16):
            out = model(batch["input_ids"], batch["images"], batch["labels"])
        num_tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        (out.lm_loss_sum / max(num_tokens, 1) + out.aux_loss).backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times[spec["warmup"]:])
    # one micro-batch per step: the demo's global batch is its micro-batch (train.global_batch_size)
    assert stage_global_batch(cfg, stage) == micro, "the demo config no longer steps on one micro-batch"
    return {"step_s": step_s, "samples_per_s": micro / step_s, "step_times": times,
            "warmup": spec["warmup"], "stage": stage.name, "moe_mode": stage.moe_mode}


def worker_throughput(spec: dict) -> dict:
    """The loader at each of spec's worker counts, then the demo's training step (which sets the
    trainer's thread count and allocator, so it comes last), over one dataset."""
    ds = _open_dataset(spec)
    loaders = {}
    for workers in spec["workers"]:
        try:
            loaders[workers] = measure_loader(ds, spec, workers)
        except Exception as e:  # noqa: BLE001 -- a loader that fails is a row saying why, not the end of the run
            loaders[workers] = {"error": f"{type(e).__name__}: {str(e)[:160]}"}
    indexed = dir_bytes(Path(spec["index_dir"])) > 0
    return {"loaders": loaders, "train": measure_train(ds, spec), "indexed": indexed}


WORKERS = {"startup": worker_startup, "throughput": worker_throughput}


def run_worker(kind: str, spec: dict, tree: Path, timeout: float) -> dict:
    """One measurement in a fresh process importing the package from `tree`; {"error": why} if it fails."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, json.dumps(spec)]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"not done within {timeout:.0f} s"}
    if r.returncode != 0:
        lines = r.stderr.strip().splitlines() or ["no output"]
        return {"error": f"{kind} worker failed: {lines[-1][:200]}"}
    out = json.loads(r.stdout.strip().splitlines()[-1])
    if "package" in out and not out["package"].startswith(str(tree)):
        raise RuntimeError(f"the {kind} worker imported {out['package']}, not the tree {tree}")
    return out


# --------------------------------------------------------------------------- set-up

def machine() -> str:
    """CPU model, cores, memory and the date (UTC), as the benchmark tables name them."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30 if hasattr(os, "sysconf") else 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"{model}, {cores} cores usable ({os.cpu_count()} visible), {mem:.0f} GiB; "
            f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; Python {platform.python_version()}")


def legacy_tree(work: Path) -> tuple[Path | None, str]:
    """Today's package (commit LEGACY_COMMIT) extracted under work/legacy: (path, "") or (None, why)."""
    dest = work / "legacy"
    if (dest / "megatron_evomoe" / "__init__.py").exists():
        return dest, ""
    dest.mkdir(parents=True, exist_ok=True)
    try:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", LEGACY_COMMIT, "megatron_evomoe"],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as e:
        why = e.stderr.decode(errors="replace").strip()[:120] if getattr(e, "stderr", None) else str(e)
        return None, f"cannot extract commit {LEGACY_COMMIT}: {why}"
    return dest, ""


def write_mix(folder: Path, num_records: int, seed: int, geometry, sides, tokenizer: Path, prefix_records: int = 0):
    """The mix (and its first prefix_records records as a second file): (stats, prefix stats, image root)."""
    folder.mkdir(parents=True, exist_ok=True)
    pool = mix.write_image_pool(folder / "images" / "pool", sides, seed)
    stats = mix.generate(folder / "mix.json", num_records, seed, geometry, tokenizer, pool)
    prefix = mix.generate(folder / "prefix.json", prefix_records, seed, geometry, tokenizer, pool) \
        if prefix_records else None
    return stats, prefix, folder / "images"


def _spec(stats, images: Path, tokenizer: Path, geometry, image_size: int, index_dir: Path | None) -> dict:
    return {"json": stats.path, "image_root": str(images), "tokenizer": str(tokenizer), "seq_len": geometry.seq_len,
            "num_image_tokens": geometry.num_image_tokens, "image_size": image_size,
            "index_dir": str(index_dir) if index_dir else None}


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


# --------------------------------------------------------------------------- the tables

def _row(name: str, records: int, r: dict, note: str = "") -> dict:
    if "error" in r:
        return {"path": name, "records": records, "wall_s": None, "peak_rss_mib": None, "rss_after_imports_mib": None,
                "note": r["error"]}
    return {"path": name, "records": records, "wall_s": r["wall_s"], "peak_rss_mib": r["peak_rss"] / MIB,
            "rss_after_imports_mib": r["base_rss"] / MIB, "note": note}


def _startup(a, stats, images: Path, tokenizer: Path, index_dir: Path | None, tree: Path,
             legacy: bool = False) -> dict:
    """One start-up measurement of stats' file; an error if the dataset's samples or tokens differ from
    the records written (`legacy`: as the legacy tree's template renders them, without a system prompt)."""
    r = run_worker("startup", _spec(stats, images, tokenizer, mix.LLAVA, LLAVA_IMAGE_SIZE, index_dir), tree, a.timeout)
    system = (mix.prefix_tokens() - 1) * stats.num_records if legacy else 0
    expected = (stats.num_records, int(stats.lengths.sum(dtype=np.int64)) - system)
    if "error" not in r and (r["num_samples"], r["num_tokens"]) != expected:
        return {"error": f"WRONG: {r['num_samples']} samples of {r['num_tokens']} tokens, expected {expected}"}
    return r


def startup_table(a, work: Path, full, prefix, images, tokenizer) -> tuple[list, dict]:
    """(a) and (b): rows, and {"index_dir": the full mix's index or None, "why": why not}."""
    rows = []
    legacy, why = legacy_tree(work)
    name = f"today ({LEGACY_COMMIT}): parse + tokenise to int64"
    r = _startup(a, prefix, images, tokenizer, None, legacy, legacy=True) if legacy else \
        {"error": f"not available: {why}"}
    rows.append(_row(name, prefix.num_records, r, "measured"))
    k = full.num_records / prefix.num_records
    if "error" not in r and k != 1:
        rows.append({"path": f"today ({LEGACY_COMMIT}), extrapolated", "records": full.num_records,
                     "wall_s": r["wall_s"] * k, "peak_rss_mib": (r["base_rss"] + (r["peak_rss"] - r["base_rss"]) * k)
                     / MIB, "rss_after_imports_mib": r["base_rss"] / MIB,
                     "note": f"NOT measured: linear extrapolation x{k:.2f} of the row above"})
    index = {"index_dir": None, "why": ""}
    for folder in ("index_prefix", "index_full"):
        shutil.rmtree(work / folder, ignore_errors=True)  # a cold start-up finds none (e.g. after --keep)
    # The new path on the small file first: if no index appears, this tree has no token index, and the
    # full file must not be parsed the old way (tens of GiB).
    r = _startup(a, prefix, images, tokenizer, work / "index_prefix", ROOT)
    if "error" in r or dir_bytes(work / "index_prefix") == 0:
        index["why"] = f"not available: {r['error']}" if "error" in r else \
            "not available: LlavaDataset(index_dir=) wrote nothing there (no token index in this tree)"
        rows.append(_row("token index", prefix.num_records, {"error": index["why"]}))
        return rows, index
    if k != 1:
        rows.append(_row("token index, cold (build)", prefix.num_records, r, "measured (as today's row)"))
    cold = _startup(a, full, images, tokenizer, work / "index_full", ROOT)
    rows.append(_row("token index, cold (build)", full.num_records, cold, "measured"))
    if "error" in cold:
        index["why"] = f"not available: {cold['error']}"
        return rows, index
    warm = _startup(a, full, images, tokenizer, work / "index_full", ROOT)
    rows.append(_row("token index, warm (open)", full.num_records, warm, "measured"))
    index["index_dir"] = work / "index_full"
    return rows, index


def size_table(full, index: dict) -> list:
    """(c): the full mix's index on disk, per text token (from the generator's exact counts)."""
    text_tokens = full.num_text_tokens(mix.LLAVA)
    if index["index_dir"] is None:
        return [{"records": full.num_records, "text_tokens": text_tokens, "index_bytes": None,
                 "bytes_per_text_token": None, "json_bytes": full.num_bytes, "note": index["why"]}]
    num_bytes = dir_bytes(index["index_dir"])
    return [{"records": full.num_records, "text_tokens": text_tokens, "index_bytes": num_bytes,
             "bytes_per_text_token": num_bytes / text_tokens, "json_bytes": full.num_bytes, "note": ""}]


def demo_geometry() -> tuple:
    """(Geometry, image size, micro-batch) of the demo's config."""
    from megatron_evomoe.config import load_config, stage_global_batch
    cfg = load_config(str(DEMO_CONFIG))
    return (mix.Geometry(cfg.vision.num_image_tokens, cfg.data.seq_len), cfg.vision.image_size,
            cfg.train.micro_batch_size)


def _step_note(train: dict) -> str:
    timed = train["step_times"][train["warmup"]:]
    return (f"step {train['step_s'] * 1e3:.0f} ms: median of {len(timed)} after {train['warmup']} warm-up "
            f"({min(timed) * 1e3:.0f} to {max(timed) * 1e3:.0f} ms)")


def loader_table(a, work: Path, tokenizer: Path) -> list:
    """(d): the demo's training step, then the loader at each worker count, over the demo-geometry mix."""
    geometry, image_size, micro = demo_geometry()
    demo, _, images = write_mix(work / "demo", a.loader_records, a.seed, geometry, DEMO_IMAGE_SIDES, tokenizer)
    shutil.rmtree(work / "index_demo", ignore_errors=True)
    spec = {**_spec(demo, images, tokenizer, geometry, image_size, work / "index_demo"), "seed": a.seed,
            "stage": a.train_stage, "warmup": a.train_warmup, "steps": a.train_steps, "workers": a.workers,
            "micro_batch": micro, "batches": a.loader_batches}
    result = run_worker("throughput", spec, ROOT, a.timeout)
    train = result.get("train", result)
    rows = [{"what": f"demo training step (stage '{a.train_stage}', micro-batch {micro})", "workers": None,
             "samples_per_s": train.get("samples_per_s"), "vs_training_step": None,
             "note": train.get("error") or _step_note(train)}]
    for workers in a.workers:
        r = result["loaders"][str(workers)] if "loaders" in result else result
        source = "token index" if result.get("indexed") else "parsed file: no token index in this tree"
        note = r.get("error", f"{a.loader_batches} batches after the first ({r.get('first_batch_s', 0):.2f} s); "
                              f"dataset: {source}")
        if "error" not in r and workers > 0 and not r["in_workers"]:
            r, note = {}, "not available: MicroBatchLoader ran in the main process (no worker processes in this tree)"
        rate, step = r.get("samples_per_s"), train.get("samples_per_s")
        rows.append({"what": "MicroBatchLoader", "workers": workers, "samples_per_s": rate,
                     "vs_training_step": rate / step if rate and step else None, "note": note})
    return rows


def padding_table(a, full, images: Path, tokenizer: Path, index: dict) -> list:
    """(e): padding at seq_len on the full mix's lengths (the index's, or the generator's without one)."""
    seq_len = mix.LLAVA.seq_len
    lengths, source = full.lengths.astype(np.int64), "generator (no token index)"
    if index["index_dir"] is not None:
        spec = _spec(full, images, tokenizer, mix.LLAVA, LLAVA_IMAGE_SIZE, index["index_dir"])
        indexed = np.asarray(_open_dataset(spec).lengths, dtype=np.int64)
        source = f"token index (equal to the generator's: {'yes' if np.array_equal(indexed, lengths) else 'NO'})"
        lengths = indexed
    total = int(lengths.sum())
    rows = [{"packing": "none (one record per row)", "rows": len(lengths), "samples_per_row": 1.0,
             "padding": 1 - total / (len(lengths) * seq_len), "note": f"lengths from the {source}"}]
    try:
        from megatron_evomoe.data.packing import pack_rows
    except ImportError:
        rows.append({"packing": f"pack_rows, windows of {a.window}", "rows": None, "samples_per_row": None,
                     "padding": None, "note": "not available: megatron_evomoe.data.packing has no pack_rows"})
        return rows
    stream = lengths[np.random.default_rng(a.seed).permutation(len(lengths))]
    num_rows = 0
    for start in range(0, len(stream), a.window):
        window = stream[start:start + a.window]
        packed = pack_rows(window.tolist(), seq_len)
        positions = sorted(p for row in packed for p in row)
        if positions != list(range(len(window))) or any(window[row].sum() > seq_len for row in packed):
            rows.append({"packing": f"pack_rows, windows of {a.window}", "rows": None, "samples_per_row": None,
                         "padding": None, "note": f"WRONG: pack_rows broke its contract on the window at {start}"})
            return rows
        num_rows += len(packed)
    rows.append({"packing": f"pack_rows, windows of {a.window}", "rows": num_rows,
                 "samples_per_row": len(lengths) / num_rows, "padding": 1 - total / (num_rows * seq_len),
                 "note": "shuffled stream, as the trainer packs"})
    return rows


TARGETS = [  # issue 13's targets: (what, table, row predicate, key, scale, "<=" or ">=", threshold)
    ("cold start-up wall s", "start-up", "token index, cold (build)", "wall_s", 1, "<=", 120),
    ("cold start-up peak RSS GiB", "start-up", "token index, cold (build)", "peak_rss_mib", 1 / 1024, "<=", 3),
    ("warm start-up wall s", "start-up", "token index, warm (open)", "wall_s", 1, "<=", 10),
    ("warm start-up peak RSS GiB", "start-up", "token index, warm (open)", "peak_rss_mib", 1 / 1024, "<=", 1),
    ("index bytes per text token", "size", None, "bytes_per_text_token", 1, "<=", 2),
    ("loader with 2 workers / training step", "loader", 2, "vs_training_step", 1, ">=", 3),
    ("padding with packing", "padding", "pack_rows", "padding", 1, "<=", 0.15),
]


def targets_table(tables: dict, records: int) -> list:
    """Each target against its figure in the tables above (at --records; the issue's are for 665,000)."""
    start, size, loader, padding = tables.values()
    found = {
        "start-up": lambda name: next((r for r in start if r["path"] == name and r["records"] == records), None),
        "size": lambda _: size[0],
        "loader": lambda workers: next((r for r in loader if r["workers"] == workers), None),
        "padding": lambda prefix: next((r for r in padding if r["packing"].startswith(prefix)), None),
    }
    rows = []
    for what, table, which, key, scale, op, threshold in TARGETS:
        row = found[table](which)
        value = None if row is None or row[key] is None else row[key] * scale
        met = None if value is None else (value <= threshold if op == "<=" else value >= threshold)
        rows.append({"target": what, "threshold": f"{op} {threshold}", "measured": value,
                     "met": {None: "not available", True: "yes", False: "NO"}[met],
                     "note": "" if records == mix.DEFAULT_RECORDS else f"at {records:,} records (the target: 665,000)"})
    return rows


# --------------------------------------------------------------------------- printing

def _cell(value, digits: int) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


COLUMNS = {  # table -> [(key, header, digits)]
    "start-up, one rank (fresh process each)": [
        ("path", "path", 0), ("records", "records", 0), ("wall_s", "wall s", 2), ("peak_rss_mib", "peak RSS MiB", 0),
        ("rss_after_imports_mib", "peak RSS after imports MiB", 0), ("note", "note", 0)],
    "token index size": [
        ("records", "records", 0), ("text_tokens", "text tokens", 0), ("index_bytes", "index bytes", 0),
        ("bytes_per_text_token", "bytes / text token", 3), ("json_bytes", "JSON bytes", 0), ("note", "note", 0)],
    "loader vs the demo's training step (demo geometry)": [
        ("what", "what", 0), ("workers", "workers", 0), ("samples_per_s", "samples/s", 0),
        ("vs_training_step", "x training step", 2), ("note", "note", 0)],
    "padding at seq_len 2048": [
        ("packing", "packing", 0), ("rows", "rows", 0), ("samples_per_row", "samples / row", 2),
        ("padding", "padding", 4), ("note", "note", 0)],
    "issue 13 targets": [
        ("target", "target", 0), ("threshold", "threshold", 0), ("measured", "measured", 3), ("met", "met", 0),
        ("note", "note", 0)],
}


def print_tables(tables: dict) -> None:
    for title, rows in tables.items():
        cols = COLUMNS[title]
        print_table([h for _, h, _ in cols], [[_cell(r[k], d) for k, h, d in cols] for r in rows], title=title)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS)
    p.add_argument("--records", type=int, default=mix.DEFAULT_RECORDS, help="records of the synthetic mix")
    p.add_argument("--legacy-records", type=int, default=None, help="records today's path runs on (default N/10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--window", type=int, default=256, help="samples per packing window")
    p.add_argument("--workers", type=lambda s: [int(v) for v in s.split(",")], default=[0, 2, 4],
                   help="loader worker counts, comma-separated")
    p.add_argument("--loader-records", type=int, default=20_000, help="records of the demo-geometry mix")
    p.add_argument("--loader-batches", type=int, default=50, help="micro-batches timed per loader row")
    p.add_argument("--train-stage", default="warmup", help="the demo stage whose step is timed (its stage I)")
    p.add_argument("--train-steps", type=int, default=10, help="training steps timed (median reported)")
    p.add_argument("--train-warmup", type=int, default=2, help="untimed training steps first")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="a word tokenizer folder (default: the demo's bundled one, built in the work dir)")
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/evomoe_data_pipeline"))
    p.add_argument("--keep", action="store_true", help="keep the work dir (mixes, indexes, today's tree)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds one measurement may take")
    p.add_argument("--json-out", type=Path, default=None, help="also write the tables to this JSON file")
    a = p.parse_args(argv)
    if a.worker:
        print(json.dumps(WORKERS[a.worker[0]](json.loads(a.worker[1]))))
        return 0
    sys.path.insert(0, str(ROOT))  # this tree (a worker imports the tree its PYTHONPATH names)
    a.legacy_records = a.legacy_records or max(1, a.records // 10)
    if not 1 <= a.legacy_records <= a.records:
        p.error(f"--legacy-records must be in [1, --records={a.records}], got {a.legacy_records}")
    work, where = a.work_dir, machine()
    print(f"== data pipeline at LLaVA scale, {where}")
    try:
        tokenizer = a.tokenizer or mix.bundled_tokenizer(work)
        full, prefix, images = write_mix(work / "llava", a.records, a.seed, mix.LLAVA, LLAVA_IMAGE_SIDES, tokenizer,
                                         a.legacy_records)
        print(f"synthetic mix: {full.num_records:,} records ({full.num_text_only / full.num_records:.1%} text-only), "
              f"{full.num_bytes / 1e9:.3f} GB written in {full.seconds:.1f} s; {mix.LLAVA.num_image_tokens} image "
              f"tokens, seq_len {mix.LLAVA.seq_len}, mean {full.lengths.mean():.0f} tokens; today's path on the first "
              f"{prefix.num_records:,} records")
        rows, index = startup_table(a, work, full, prefix, images, tokenizer)
        tables = {"start-up, one rank (fresh process each)": rows, "token index size": size_table(full, index),
                  "loader vs the demo's training step (demo geometry)": loader_table(a, work, tokenizer),
                  "padding at seq_len 2048": padding_table(a, full, images, tokenizer, index)}
        tables["issue 13 targets"] = targets_table(tables, a.records)
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    print_tables(tables)
    if a.json_out:
        out = {"machine": where, "records": a.records, "legacy_records": a.legacy_records, "seed": a.seed,
               "mix": {"bytes": full.num_bytes, "seconds": full.seconds, "text_only": full.num_text_only,
                       "mean_tokens": float(full.lengths.mean())}, "tables": tables}
        tmp = a.json_out.with_name(a.json_out.name + ".tmp")
        tmp.write_text(json.dumps(out, indent=1))
        os.replace(tmp, a.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
