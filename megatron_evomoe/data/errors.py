"""The one exception type of the data pipeline.

A `DataError` is a user mistake in the data (a missing image, a malformed record,
an over-long sample, a corrupt file), so it subclasses `ValueError` as the project
conventions ask.  It carries the pieces of its location separately (file, record
index, record id, field) so that code deep down (the conversation renderer, which
knows the field but not the file) can raise it, and the dataset, which knows the
file and the record, can add that context with `with_context` before re-raising.

`reason` is a short stable key ("missing_image", "too_long", ...) used to count
skipped records when the user allows skipping.
"""
from __future__ import annotations

from typing import Optional, Union

RecordId = Union[str, int, None]


class DataError(ValueError):
    """A problem with the training/evaluation data, located as precisely as known."""

    def __init__(
        self,
        message: str,
        *,
        file: Optional[str] = None,
        index: Optional[int] = None,
        record_id: RecordId = None,
        field: Optional[str] = None,
        reason: str = "bad_record",
    ):
        self.message = message
        self.file = None if file is None else str(file)
        self.index = index
        self.record_id = record_id
        self.field = field
        self.reason = reason
        super().__init__(self._format())

    def _format(self) -> str:
        where = []
        if self.file is not None:
            where.append(self.file)
        if self.index is not None:
            rec = f"record {self.index}"
            if self.record_id is not None:
                rec += f" (id={self.record_id!r})"
            where.append(rec)
        elif self.record_id is not None:
            where.append(f"record id={self.record_id!r}")
        if self.field is not None:
            where.append(f"field '{self.field}'")
        prefix = ": ".join(where)
        return f"{prefix}: {self.message}" if prefix else self.message

    def __reduce__(self):
        # Keep the location fields across pickling (DataLoader workers, multiprocessing).
        return (_rebuild, (self.message, self.file, self.index, self.record_id, self.field, self.reason))

    def with_context(
        self,
        *,
        file: Optional[str] = None,
        index: Optional[int] = None,
        record_id: RecordId = None,
    ) -> "DataError":
        """A copy with the location filled in (fields already set are kept)."""
        return DataError(
            self.message,
            file=self.file if self.file is not None else file,
            index=self.index if self.index is not None else index,
            record_id=self.record_id if self.record_id is not None else record_id,
            field=self.field,
            reason=self.reason,
        )


def _rebuild(message, file, index, record_id, field, reason) -> DataError:
    return DataError(message, file=file, index=index, record_id=record_id, field=field, reason=reason)
