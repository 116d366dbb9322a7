"""The token index: a stage file validated and tokenised once, stored compactly on disk, memory-mapped
by every process that reads it.

One index per key: the data file (its path, and its content through a hash), the tokenizer's
vocabulary and special ids, the conversation template, num_image_tokens, seq_len, data.overlong,
skip_bad_samples, check_images, image_root, and the format version.  All but the content name the
folder, `<index_dir>/<file stem>-<hash16>/`; its `manifest.json` holds the whole key, the file's
size, mtime_ns and blake2b, the counts and the token dtype.

Atomic as checkpoints are (checkpointing.py): the builder writes into `.tmp-<name>-<host>-<pid>`,
fsyncs every file, writes the manifest last, and renames the folder into place; a folder without a
valid manifest is never read.  Exactly one process builds: `.build-<name>/.lock` (run_lock.py,
holder host + pid, a dead holder's lock taken over); every other process polls for the manifest and
then maps the files, so this needs no process group: every rank simply calls `open_index`.

Warm start: the manifest's key equal, and the file's size and mtime_ns equal (else its hash equal:
a touched but unchanged file is reused), the index opens in the time of a few small reads.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np

from ..checkpointing import CheckpointError, _fsync_dir, remove_stale_temporaries, write_file_atomic
from ..process_identity import owner_tag
from ..run_lock import LOCK_NAME, RunLock, read_holder
from .conversation import IGNORE_INDEX
from .errors import DataError
from .index_builder import build_index
from .record_encoder import RecordEncoder
from .string_table import IndexedView, IntView, PathView, StringView, ends_of, id_view, smallest_uint
from .tokenizer import Tokenizer

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2
MANIFEST = "manifest.json"
POLL_S = 0.2
WAIT_TIMEOUT_S = 3600.0  # a LLaVA-mix build takes minutes; a waiter gives up (naming the builder) after this
NUM_FIRST_IDS = 5  # record ids named in the summary lines


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    """A hash of what decides the token ids: the vocabulary (WordTokenizer's tokens, a Hugging Face
    tokenizer's whole serialisation) and the special ids."""
    h = hashlib.blake2b(digest_size=16)
    h.update(type(tokenizer).__name__.encode())
    special = (tokenizer.vocab_size, tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.image_token_id,
               tokenizer.add_bos)
    h.update(json.dumps(special).encode())
    if hasattr(tokenizer, "tokens"):
        h.update(json.dumps(tokenizer.tokens).encode())
    elif hasattr(tokenizer, "_tok"):
        h.update(tokenizer._tok.to_str().encode())
    else:
        raise ValueError(f"cannot fingerprint a {type(tokenizer).__name__} for the token index (no vocabulary)")
    return h.hexdigest()


def file_hash(path: str) -> str:
    h = hashlib.blake2b(digest_size=32)
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def _file_stat(path: str) -> Dict:
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def index_key(json_path: str, image_root: str, tokenizer: Tokenizer, seq_len: int, num_image_tokens: int,
              template, overlong: str, skip_bad_samples: bool, check_images: bool) -> Dict:
    return {"format_version": FORMAT_VERSION, "data_file": os.path.abspath(json_path),
            "image_root": os.path.abspath(image_root) if image_root else "",
            "tokenizer": tokenizer_fingerprint(tokenizer), "template": template.key(), "seq_len": int(seq_len),
            "num_image_tokens": int(num_image_tokens), "overlong": overlong,
            "skip_bad_samples": bool(skip_bad_samples), "check_images": bool(check_images)}


def index_folder(index_dir: str, key: Dict) -> str:
    digest = hashlib.blake2b(json.dumps(key, sort_keys=True).encode(), digest_size=8).hexdigest()
    stem = os.path.splitext(os.path.basename(key["data_file"]))[0]
    return os.path.join(index_dir, f"{stem}-{digest}")


def _read_manifest(folder: str) -> Optional[Dict]:
    try:
        with open(os.path.join(folder, MANIFEST)) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _is_current(folder: str, key: Dict, rehash: bool = True) -> bool:
    """The folder's manifest is of this key and of the data file as it is now (by its size and
    mtime_ns, else, with `rehash`, by its content)."""
    manifest = _read_manifest(folder)
    if manifest is None or manifest.get("key") != key:
        return False
    stat = _file_stat(key["data_file"])
    if manifest.get("source") == stat:
        return True
    if not rehash or manifest.get("content_hash") != file_hash(key["data_file"]):
        return False
    manifest["source"] = stat  # touched, not changed: next time the stat says so at once
    try:
        write_file_atomic(Path(folder, MANIFEST), json.dumps(manifest, indent=1))
    except OSError:
        pass  # a read-only index folder: still current, only slower to confirm
    return True


def open_index(json_path, image_root, tokenizer: Tokenizer, seq_len: int, num_image_tokens: int, *,
               template, overlong: str = "error", skip_bad_samples: bool = False,
               check_images: bool = False, index_dir=None, num_workers: int = 0,
               wait_timeout_s: float = WAIT_TIMEOUT_S) -> "TokenIndex":
    """The index of this key, built here if no current one exists and no other process builds it."""
    json_path = os.fspath(json_path)
    if not os.path.isfile(json_path):
        raise DataError("data file not found", file=json_path, reason="missing_file")
    image_root = "" if image_root is None else os.fspath(image_root)
    index_dir = os.path.abspath(os.fspath(index_dir) if index_dir is not None
                                else os.path.join(os.path.dirname(json_path), ".token_index"))
    key = index_key(json_path, image_root, tokenizer, seq_len, num_image_tokens, template, overlong,
                    skip_bad_samples, check_images)
    folder = index_folder(index_dir, key)
    deadline = time.monotonic() + wait_timeout_s
    built, rehash, waited = False, True, False
    while not _is_current(folder, key, rehash):
        rehash = False  # while another process builds, polls compare the stat only (not a GB of hashing)
        lock = _try_lock(index_dir, folder)
        if lock is None:
            if not waited:
                logger.info("%s: waiting for its token index, which another process builds (%s)", json_path,
                            _holder_text(folder))
                waited = True
            if time.monotonic() > deadline:
                raise DataError(f"waited {wait_timeout_s:.0f} s for the token index {folder} that another process "
                                f"builds ({_holder_text(folder)}); if it is gone, delete {_lock_dir(folder)}",
                                file=json_path, reason="index_timeout")
            time.sleep(POLL_S)
            continue
        try:
            if not _is_current(folder, key, rehash=False):  # (another may have finished before we locked)
                encoder = RecordEncoder(json_path, image_root, tokenizer, seq_len, num_image_tokens,
                                        template=template, check_images=check_images, overlong=overlong,
                                        skip_bad_samples=skip_bad_samples, token_dtype=token_dtype(tokenizer))
                _build(folder, key, encoder, num_workers)
                built = True
        finally:
            lock.release()
            try:  # the empty lock folder; not one where another process has just taken the lock
                os.rmdir(_lock_dir(folder))
            except OSError:
                pass
    index = TokenIndex(folder)
    index.built = built
    return index


def token_dtype(tokenizer: Tokenizer) -> np.dtype:
    """The smallest unsigned type that holds every id: uint16 for LLaMA/Vicuna (32k) and Phi-2 (51k),
    uint32 for Qwen2 (151k) and StableLM-2 (100k), uint8 for a word tokenizer of < 256 words."""
    return smallest_uint(tokenizer.vocab_size - 1)


def _lock_dir(folder: str) -> str:
    return os.path.join(os.path.dirname(folder), f".build-{os.path.basename(folder)}")


def _try_lock(index_dir: str, folder: str) -> Optional[RunLock]:
    """This key's build lock, or None while another live process holds it."""
    try:
        os.makedirs(index_dir, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create the token index folder {index_dir}: {e.strerror or e} (set data.index_dir "
                        "to a writable folder)", reason="index_dir") from None
    if not os.access(index_dir, os.W_OK | os.X_OK):  # else the lock below fails as if held, for an hour
        raise DataError(f"the token index folder {index_dir} is not writable and holds no current index of "
                        "this file (set data.index_dir to a writable folder)", reason="index_dir")
    try:
        return RunLock.acquire(_lock_dir(folder))
    except CheckpointError:  # held by a live process (or being written right now): poll again
        return None


def _holder_text(folder: str) -> str:
    held = read_holder(Path(_lock_dir(folder), LOCK_NAME))
    if not held:
        return "lock holder unknown"
    return f"host {held.get('host')}, pid {held.get('pid')}, started {held.get('started')}"


def _build(folder: str, key: Dict, encoder: RecordEncoder, num_workers: int) -> None:
    """Build into a temporary folder, then rename it into place (replacing a stale index)."""
    root, name = os.path.dirname(folder), os.path.basename(folder)
    remove_stale_temporaries(Path(root))  # what dead builders left: .tmp-*; .old-* put back if missing
    tmp = os.path.join(root, f".tmp-{name}-{owner_tag()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        source = _file_stat(key["data_file"])
        content_hash = file_hash(key["data_file"])
        counts = build_index(tmp, key["data_file"], encoder, num_workers)
        if os.stat(key["data_file"]).st_mtime_ns != source["mtime_ns"]:
            raise DataError("changed while its token index was built; run again", file=key["data_file"],
                            reason="changed_file")
        manifest = {"key": key, "source": source, "content_hash": content_hash, "dtype": encoder.token_dtype.name,
                    **counts}
        write_file_atomic(Path(tmp, MANIFEST), json.dumps(manifest, indent=1))
        _fsync_dir(Path(tmp))
        aside = os.path.join(root, f".old-{name}-{owner_tag()}")
        if os.path.exists(folder):
            os.replace(folder, aside)
        os.replace(tmp, folder)
        _fsync_dir(Path(root))
        shutil.rmtree(aside, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("%s: token index built in %.1f s: %s", key["data_file"], counts["build_seconds"], folder)


class TokenIndex:
    """A built index, memory-mapped.  tokens(i) -> (ids int64 [L], labels int64 [L]), L = lengths[i]."""

    def __init__(self, folder: str):
        self.folder = folder
        self.built = False  # whether this process built it (open_index sets it)
        manifest = _read_manifest(folder)
        assert manifest is not None, f"{folder}: no manifest"
        self.manifest = manifest
        key = manifest["key"]
        self.num_image_tokens = key["num_image_tokens"]
        path = os.path.join(folder, "tokens.bin")
        self._tokens = (np.memmap(path, dtype=manifest["dtype"], mode="r") if os.path.getsize(path)
                        else np.zeros(0, dtype=manifest["dtype"]))
        num_stored = self._load("num_stored")
        self._offsets = np.concatenate([[0], np.cumsum(num_stored, dtype=np.int64)])  # [N + 1]
        self._image_pos = self._load("image_pos")
        self._span_offsets = np.concatenate([[0], np.cumsum(self._load("span_counts"), dtype=np.int64)])
        self._span_runs = self._load("span_runs")
        self.has_image = np.asarray(self._image_pos) > 0  # [N] bool (for grouping by modality)
        self.num_text_tokens = num_stored.astype(np.int64) - self.has_image  # [N]
        self.lengths = self.num_text_tokens + self.has_image * self.num_image_tokens  # [N] expanded
        self.num_records = manifest["num_records"]
        skipped_index = self._load("skipped_index")
        self.record_indices = IntView(np.delete(np.arange(self.num_records, dtype=np.int64), skipped_index))
        self.record_ids = id_view(manifest["id_kind"], self._load("id_blob"), self._load("id_lengths"))
        root = key["image_root"]  # paths stored as the records give them, relative to it
        paths = PathView(root, self._strings("image_dir"), self._load("image_dir_codes"), self._strings("image_name"))
        self.image_paths = IndexedView(paths, self._load("image_codes"))
        self.truncated_ids = IndexedView(self.record_ids, self._load("truncated"), base=0)
        self.skipped_ids = id_view(manifest["skipped_id_kind"], self._load("skipped_id_blob"),
                                   self._load("skipped_id_lengths"))
        self.skipped_indices = IntView(skipped_index)
        reasons = manifest["skipped_reasons"]
        self.skipped_reasons = [reasons[c] for c in self._load("skipped_reason")]

    def _strings(self, name: str) -> StringView:
        return StringView(self._load(name + "_blob"), ends_of(self._load(name + "_lengths")))

    def _load(self, name: str) -> np.ndarray:
        return np.load(os.path.join(self.folder, name + ".npy"), mmap_mode="r")

    def __len__(self) -> int:
        return len(self.lengths)

    def tokens(self, i: int, image_token_id: int) -> Tuple[np.ndarray, np.ndarray]:
        start, end = int(self._offsets[i]), int(self._offsets[i + 1])
        ids = self._tokens[start:end].astype(np.int64)  # [stored]
        at = int(self._image_pos[i]) - 1
        shift = 0
        if at >= 0:
            assert ids[at] == image_token_id, f"{self.folder}: record {i}: no image token at its image position"
            ids = np.concatenate([ids[:at], np.full(self.num_image_tokens, image_token_id, np.int64), ids[at + 1:]])
            shift = self.num_image_tokens - 1
        labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int64)  # [L]
        runs = self._span_runs[self._span_offsets[i]:self._span_offsets[i + 1]]  # [spans, 2] (gap, length)
        bounds = np.cumsum(runs.reshape(-1), dtype=np.int64).reshape(-1, 2)  # [spans, 2] (start, end)
        for s, e in bounds.tolist():
            if at >= 0 and s > at:  # spans never hold the image position: after it, shifted by the expansion
                s, e = s + shift, e + shift
            labels[s:e] = ids[s:e]
        return ids, labels

    def file_bytes(self) -> int:
        return sum(os.path.getsize(os.path.join(self.folder, f)) for f in os.listdir(self.folder))

    def summarise(self, path: str) -> None:
        """The skip summary line (as the dataset always logged it) and the truncation line."""
        m = self.manifest
        skipped = m["skipped"]
        total = sum(skipped.values())
        if total == 0:
            logger.info("%s: %d records, none skipped", path, m["num_records"])
        else:
            reasons = ", ".join(f"{k}={v}" for k, v in sorted(skipped.items()))
            first_ids = ", ".join(repr(x) for x in self.skipped_ids[:NUM_FIRST_IDS])
            logger.warning("%s: skipped %d of %d records (%s); first: %s; first ids: %s", path, total,
                           m["num_records"], reasons, m["first_error"], first_ids)
        if m["num_truncated"]:
            first_ids = ", ".join(repr(x) for x in self.truncated_ids[:NUM_FIRST_IDS])
            logger.warning("%s: truncated %d of %d records to seq_len=%d (data.overlong=truncate); first ids: %s",
                           path, m["num_truncated"], m["num_records"], m["key"]["seq_len"], first_ids)
