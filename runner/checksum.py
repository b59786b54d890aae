"""The checksum of output files (resume records, manifests): CRC-32 with zlib's
polynomial, so values equal `zlib.crc32`, computed by ISA-L (carry-less multiply
instructions) at several times zlib's speed."""

from __future__ import annotations

try:
    from isal.isal_zlib import crc32
except ImportError:  # a platform without ISA-L wheels: same values, slower
    from zlib import crc32

__all__ = ["crc32"]
