"""Packing several samples into one row of `data.seq_len` tokens (data.packing=pack).

    rows = pack_rows(lengths, seq_len)                 # which samples share a row
    batch = collate_packed(samples_per_row, seq_len, pad_id, image_size)

`pack_rows` is best-fit-decreasing over one window of the sample stream: samples longest first
(equal lengths in stream order), each into the open row it fills most tightly (equal room: the
older row), else into a new row. It is a pure function of its inputs, so every rank and every
restart plans the same rows.

`collate_packed` lays each row's samples end to end and describes the boundaries for the model
(`MultimodalLM.forward(positions=, segment_ids=)`): attention stays inside a sample and RoPE
positions restart at 0 per sample, so each sample sees exactly what it would see alone in a row.
The label of each sample's first token is ignored: in a packed row it would be predicted from the
previous sample's last token, and alone in a row it is never predicted (the loss shifts by one),
so the sum of a sample's token losses is the same packed or not.
"""
from __future__ import annotations

import bisect
from typing import List, Optional, Sequence, Tuple

import torch

from .conversation import IGNORE_INDEX

# (input_ids [L], labels [L], image [3, H, W] or None): one sample, unpadded
PackedSample = Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]


def pack_rows(lengths: Sequence[int], seq_len: int) -> List[List[int]]:
    """lengths: [N] unpadded sample lengths of one window, in stream order -> rows as lists of
    positions into `lengths` (ascending within a row; rows ordered by their first position). Every
    position appears exactly once and each row's total is <= seq_len."""
    for i, n in enumerate(lengths):
        if not 0 < int(n) <= seq_len:
            raise ValueError(f"sample {i} of the packing window is {int(n)} tokens long; a packed sample "
                             f"needs 1..data.seq_len={seq_len} tokens")
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    rows: List[List[int]] = []
    room: List[Tuple[int, int]] = []  # (free tokens, row number) of the open rows, ascending
    for i in order:
        n = int(lengths[i])
        k = bisect.bisect_left(room, (n, -1))  # the tightest row with room for n (the older on a tie)
        if k == len(room):
            rows.append([])
            free, r = seq_len, len(rows) - 1
        else:
            free, r = room.pop(k)
        rows[r].append(i)
        if free - n:
            bisect.insort(room, (free - n, r))
    rows = [sorted(row) for row in rows]
    return sorted(rows, key=lambda row: row[0])


def padding_fraction(lengths: Sequence[int], rows: Sequence[Sequence[int]], seq_len: int) -> float:
    """Fraction of the rows' seq_len * len(rows) token slots that are padding (0.0 for no rows)."""
    if not rows:
        return 0.0
    used = sum(int(lengths[i]) for row in rows for i in row)
    return 1.0 - used / (seq_len * len(rows))


def collate_packed(rows: Sequence[Sequence[PackedSample]], seq_len: int, pad_id: int, image_size: int) -> dict:
    """[B] rows of samples -> input_ids, labels, positions, segment_ids [B, S]; images [N, 3, H, W]
    in row-major order of their image slots (what `splice_rows` fills). (The padding is counted by
    the batch plan, from the lengths, for all ranks' rows: data/batch_plan.py.)

    Padding: pad_id, labels IGNORE_INDEX, segment -1, positions continuing from the row's last
    sample (a row holding one sample gets positions 0..S-1, as unpacked). A row may be empty."""
    B = len(rows)
    if not B:
        raise ValueError("cannot collate an empty batch")
    input_ids = torch.full((B, seq_len), pad_id, dtype=torch.long)  # [B, S]
    labels = torch.full((B, seq_len), IGNORE_INDEX, dtype=torch.long)  # [B, S]
    positions = torch.zeros(B, seq_len, dtype=torch.long)  # [B, S]
    segment_ids = torch.full((B, seq_len), -1, dtype=torch.long)  # [B, S]
    images = []
    for b, row in enumerate(rows):
        start = 0
        for k, (ids, labs, image) in enumerate(row):
            n = ids.shape[0]
            if start + n > seq_len:
                raise ValueError(f"row {b} holds {sum(s[0].shape[0] for s in row)} tokens, more than "
                                 f"data.seq_len={seq_len}")
            input_ids[b, start:start + n] = ids
            labels[b, start + 1:start + n] = labs[1:]  # (the first token: see the module docstring)
            positions[b, start:start + n] = torch.arange(n)
            segment_ids[b, start:start + n] = k
            if image is not None:
                images.append(image)
            start += n
        last = start - row[-1][0].shape[0] if row else 0  # where the last sample's positions began
        positions[b, start:] = torch.arange(start - last, seq_len - last)
    pixel_values = torch.stack(images) if images else torch.zeros(0, 3, image_size, image_size)
    return {"input_ids": input_ids, "labels": labels, "images": pixel_values, "positions": positions,
            "segment_ids": segment_ids}
