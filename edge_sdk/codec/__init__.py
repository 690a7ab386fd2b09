"""Wire format: a versioned, size-bounded, hash-checked envelope around compressed tensors."""

from fleetune.edge_sdk.codec.compress import (
    ENCODINGS,
    Encoding,
    decode_tensors,
    encode_tensors,
    parse_encoding,
)
from fleetune.edge_sdk.codec.envelope import (
    MAX_MESSAGE_BYTES,
    SCHEMA_VERSION,
    Header,
    decode,
    encode,
)

__all__ = [
    "ENCODINGS",
    "MAX_MESSAGE_BYTES",
    "SCHEMA_VERSION",
    "Encoding",
    "Header",
    "decode",
    "decode_tensors",
    "encode",
    "encode_tensors",
    "parse_encoding",
]
