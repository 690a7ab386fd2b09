"""Large pushes by reference (the AWS IoT Jobs pattern): the server keeps the bytes in a
content-addressed folder it serves over HTTP (``server/blobs.py``: ``GET /blobs/{sha256}``) and
sends over MQTT only ``b"FLTR" | JSON {"sha256", "size"}``; the device fetches
``{blob_url}/{sha256}`` from the base URL in its own configuration (never a URL from the
message) and checks size and sha256 before anything reads the bytes. Integrity needs no trust in
the HTTP path: what arrives must hash to the reference, and a push is signed by the fleet's key
inside. Confidentiality is the HTTP path's (plain HTTP here; put it behind TLS where adapters
are private).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from urllib.error import URLError
from urllib.request import urlopen

from fleetune.edge_sdk.errors import PayloadError, TransportError

log = logging.getLogger(__name__)
REFERENCE = b"FLTR"
MAX_BLOB_BYTES = 64 * 1024 * 1024
SHA256 = re.compile(r"[0-9a-f]{64}")


def reference(payload: bytes) -> bytes:
    digest = hashlib.sha256(payload).hexdigest()
    return REFERENCE + json.dumps({"sha256": digest, "size": len(payload)}).encode()


def read_reference(message: bytes) -> tuple[str, int]:
    """(sha256, size) of a reference message; ``PayloadError`` for anything else."""
    try:
        body = json.loads(message[len(REFERENCE) : len(REFERENCE) + 1024])
    except (UnicodeDecodeError, ValueError) as err:
        raise PayloadError(f"a blob reference is not JSON: {str(err)[:80]}") from err
    digest = body.get("sha256") if isinstance(body, dict) else None
    size = body.get("size") if isinstance(body, dict) else None
    if not isinstance(digest, str) or not SHA256.fullmatch(digest):
        raise PayloadError("a blob reference needs a sha256 of 64 lowercase hex digits")
    if not isinstance(size, int) or isinstance(size, bool) or not 0 < size <= MAX_BLOB_BYTES:
        raise PayloadError(f"a blob reference's size must be in 1..{MAX_BLOB_BYTES}")
    return digest, size


def fetch(base_url: str, digest: str, size: int, timeout: float = 60.0) -> bytes:
    """The blob ``digest`` from ``base_url``, exactly ``size`` bytes hashing to ``digest``."""
    url = f"{base_url.rstrip('/')}/{digest}"
    try:
        with urlopen(url, timeout=timeout) as response:
            data = response.read(size + 1)
    except (URLError, OSError) as err:
        raise TransportError(f"fetching {url} failed: {err}") from err
    if len(data) != size or hashlib.sha256(data).hexdigest() != digest:
        raise PayloadError(f"the blob from {url} does not match its reference")
    return data
