"""Each TLS connection the SuperLink holds reads into a 64 KiB buffer, not asyncio's 256 KiB.

Why: asyncio's ``SSLProtocol`` (the TLS layer under Flower's uvicorn server: the SuperLink
runs on plain asyncio, :mod:`.tls_handshake`) gives every connection a read buffer of the
class attribute ``SSLProtocol.max_size`` bytes, 256 KiB, made and zero-filled when the
connection is made, so it is resident for as long as the connection is open. With idle
connections kept (:mod:`.keep_alive`) the SuperLink holds one per device: 256 MiB of
buffers for 1,000 devices, measured (``bytearray`` x 1,000: +254 MiB RSS). A TLS record
is at most 16 KiB, so a 64 KiB read still takes several records at a time (nginx reads
TLS in 16 KiB). Measured on this machine (``benchmarks/bench_tls_buffer.py``, 1,000
idle connections, 256 MiB uploaded on one, 5 turns): 88 MiB of RSS per 1,000 idle
connections instead of 275, and the server's CPU per upload 0.58x stock's (median of
turns), the least of the sizes tried (32 KiB: 0.65x, 16 KiB: 0.80x).

Stock fallback (``SSLProtocol`` has no integer ``max_size``): asyncio's 256 KiB, with a
one-line warning.
"""

from __future__ import annotations

import asyncio.sslproto as sslproto
from collections.abc import Iterator
from contextlib import contextmanager

from pollinate.flower_compat._core import swapped
from pollinate.flower_compat._names import stock_instead

NAME = "asyncio.sslproto.SSLProtocol.max_size"
READ_BUFFER = 64 * 1024  # bytes a TLS connection reads into
WHY = "every kept TLS connection holds its read buffer: 256 KiB each is 256 MiB a thousand"


@contextmanager
def tls_reads_into(size: int = READ_BUFFER) -> Iterator[bool]:
    """TLS connections made inside the block on asyncio's loop read into ``size`` bytes.

    Yields whether they do (False: asyncio's own size, after one warning)."""
    stock = getattr(sslproto.SSLProtocol, "max_size", None)
    if type(stock) is not int:
        stock_instead(NAME, "is not an int", WHY)
        yield False
        return
    with swapped(sslproto.SSLProtocol, "max_size", size, why=WHY) as on:
        yield on


__all__ = ["READ_BUFFER", "tls_reads_into"]
