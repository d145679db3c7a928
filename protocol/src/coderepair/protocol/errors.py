"""The error hierarchy of the protocol.

Every decoder and verifier in this package raises a subclass of `ProtocolError`
and nothing else on bad input, so callers (the coordinator's validation pipeline,
the worker's weight fetcher) can turn any failure into a clear rejection reason
without catching broad exceptions.
"""

from __future__ import annotations


class ProtocolError(Exception):
    """Base class of every error raised on bad protocol input."""


class DecodeError(ProtocolError):
    """Bytes or text could not be decoded into the expected structure."""


class VerificationError(ProtocolError):
    """A well-formed object failed a cryptographic or consistency check."""
