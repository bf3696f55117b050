"""The one error a sample can raise while it is decoded or encoded: the loader logs it and skips the sample."""

from __future__ import annotations


class SampleError(Exception):
    """A sample that cannot be used: which sample (``key``), which member (``member``, e.g. ``audio0.flac``,
    ``json``, or ``""`` for the sample as a whole) and why."""

    def __init__(self, key: str, member: str, reason: str):
        super().__init__(f"sample {key!r}, member {member!r}: {reason}")
        self.key = key
        self.member = member
        self.reason = reason

    def __reduce__(self):  # picklable across DataLoader worker processes
        return (SampleError, (self.key, self.member, self.reason))
