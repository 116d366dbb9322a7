"""Packing several samples into one row of `data.seq_len` tokens (data.packing=pack).

Interface (to be implemented, issue 13):

    pack_rows(lengths, seq_len) -> list[list[int]]
        lengths: unpadded sample lengths (each <= seq_len) of one window of the sample stream, in
        stream order; returns rows as lists of positions into `lengths`, every position exactly once,
        each row's total <= seq_len; deterministic (a pure function of its inputs).

    collate_packed(rows, seq_len, pad_id, image_size) -> batch dict
        rows: [B] lists of samples, a sample being (input_ids [L], labels [L], image [3, H, W] or None);
        returns input_ids/labels [B, S] (labels IGNORE_INDEX on padding and on each sample's first
        token), images [N, 3, H, W] in row-major slot order, positions [B, S] restarting at 0 per sample,
        segment_ids [B, S] (sample number within the row, -1 on padding), and padding_tokens (int).
"""
