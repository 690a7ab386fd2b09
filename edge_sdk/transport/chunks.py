"""Payloads any broker accepts: a message above ``limit`` bytes (AWS IoT Core refuses MQTT
payloads over 128 KB) travels as numbered chunks on ``{topic}/c/{i}`` and a small manifest on
``{topic}`` itself, each with the same QoS and retain flag as the whole would have had.

- A chunk is ``b"FLTC" | transfer sha256 (32 bytes) | index u32 | count u32 | data``; the
  manifest is ``b"FLTM" | JSON {"sha256", "size", "chunks": [sha256 of each chunk's data]}``.
  A receiver holds chunks (and manifests) per transfer until all are there and each matches its
  checksum, then hands on the whole message, checked against its own sha256. Duplicates and any
  order are harmless; a transfer that stays incomplete for ``timeout_s`` is dropped with a
  warning, and a resend completes it from the chunks still held.
- Retained: a device that connects late gets the manifest and every chunk from the broker. A
  sender that replaces a retained chunked message with a shorter one clears the chunk topics
  the new one does not use.
- With ``blobs`` (the server with ``[server] blob_port``), a push above the limit goes by
  reference instead: the bytes over HTTP, a sha256 over MQTT (``transport/blobs.py``); a
  receiver with a ``blob_url`` fetches and checks them, retrying a failed fetch while it waits.
- With ``spool`` (the server, which acknowledges messages by hand), each chunk is written to
  disk before it is acknowledged, and what a crash left there is read back at start; the spool
  of a transfer is deleted once its whole message is acknowledged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from fleetune.edge_sdk.errors import ConfigError, PayloadError, TransportError
from fleetune.edge_sdk.store import atomic_write
from fleetune.edge_sdk.transport.base import Message, Transport
from fleetune.edge_sdk.transport.blobs import REFERENCE, fetch, read_reference

log = logging.getLogger(__name__)
CHUNK, MANIFEST = b"FLTC", b"FLTM"
_HEAD = struct.Struct(">4s32sII")
MIN_LIMIT = 1024  # bytes a chunk message may be, at least
MAX_CHUNKS = 4096  # per transfer (512 MB at 128 KB)
MAX_TRANSFERS = 64  # incomplete transfers held at once; the oldest goes first
MAX_MANIFEST_BYTES = 400_000
RETRY_FETCH_S = 2.0


class Blobs(Protocol):
    """Where a sender keeps large payloads to be fetched by reference (``server/blobs.py``)."""

    def put(self, payload: bytes) -> bytes: ...


def chunk_topic(topic: str, index: int | str) -> str:
    return f"{topic}/c/{index}"


def split(payload: bytes, limit: int) -> tuple[bytes, list[bytes]]:
    """The manifest and the chunk messages of ``payload``, none over ``limit`` bytes."""
    size = limit - _HEAD.size
    digest = hashlib.sha256(payload).digest()
    pieces = [payload[i : i + size] for i in range(0, len(payload), size)]
    if len(pieces) > MAX_CHUNKS:
        raise PayloadError(f"{len(payload)} bytes need over {MAX_CHUNKS} chunks of {size}")
    chunks = [_HEAD.pack(CHUNK, digest, i, len(pieces)) + p for i, p in enumerate(pieces)]
    manifest = {
        "sha256": digest.hex(),
        "size": len(payload),
        "chunks": [hashlib.sha256(p).hexdigest() for p in pieces],
    }
    return MANIFEST + json.dumps(manifest).encode(), chunks


@dataclass
class _Transfer:
    topic: str
    retained: bool = False
    manifest: dict | None = None
    chunks: dict[int, bytes] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)


def _manifest(payload: bytes) -> dict:
    if len(payload) > MAX_MANIFEST_BYTES:
        raise PayloadError(f"a chunk manifest of {len(payload)} bytes is over the limit")
    try:
        data = json.loads(payload[len(MANIFEST) :])
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise PayloadError(f"a chunk manifest is not JSON: {str(err)[:100]}") from err
    chunks = data.get("chunks") if isinstance(data, dict) else None
    size = data.get("size") if isinstance(data, dict) else None
    digest = data.get("sha256") if isinstance(data, dict) else None
    if (
        not isinstance(chunks, list)
        or not 1 <= len(chunks) <= MAX_CHUNKS
        or not all(isinstance(c, str) and len(c) == 64 for c in chunks)
        or not isinstance(size, int)
        or isinstance(size, bool)
        or size <= 0
        or not isinstance(digest, str)
        or len(digest) != 64
    ):
        raise PayloadError("a chunk manifest needs sha256, size and 1..4096 chunk digests")
    return data


class ChunkedTransport:
    """Wraps a :class:`Transport`: what is published above ``limit`` bytes goes out in chunks,
    and what arrives in chunks comes out of :meth:`recv` whole."""

    def __init__(
        self,
        inner: Transport,
        limit: int = 128 * 1024,
        timeout_s: float = 600.0,
        spool: str | Path | None = None,
        blobs: Blobs | None = None,
        blob_url: str = "",
    ) -> None:
        if limit < MIN_LIMIT:
            raise ConfigError(f"max_message_bytes must be at least {MIN_LIMIT}, got {limit}")
        self.inner, self.limit, self.timeout_s = inner, limit, timeout_s
        self.blobs, self.blob_url = blobs, blob_url
        self._fetches: list[tuple[Message, float]] = []  # references whose fetch failed, since
        self.spool = Path(spool) if spool is not None else None
        self._transfers: dict[bytes, _Transfer] = {}
        self._retained_chunks: dict[str, int] = {}  # topic -> chunk topics it holds retained
        self._ready: list[Message] = []  # whole messages the spool completed at start
        if self.spool is not None:
            self._load_spool()

    # -- the Transport interface ------------------------------------------------------------------
    def connect(self, **kwargs: float) -> None:
        self.inner.connect(**kwargs)  # MqttTransport takes a timeout

    def subscribe(self, topic_filter: str) -> None:
        self.inner.subscribe(topic_filter)
        if not topic_filter.endswith("#"):
            self.inner.subscribe(chunk_topic(topic_filter, "+"))

    def unsubscribe(self, topic_filter: str) -> None:
        self.inner.unsubscribe(topic_filter)
        if not topic_filter.endswith("#"):
            self.inner.unsubscribe(chunk_topic(topic_filter, "+"))

    def publish(
        self, topic: str, payload: bytes, retain: bool = False, timeout: float = 60.0
    ) -> None:
        chunks: list[bytes] = []
        if len(payload) > self.limit and self.blobs is not None:
            payload = self.blobs.put(payload)
        elif len(payload) > self.limit:
            manifest, chunks = split(payload, self.limit)
            for i, chunk in enumerate(chunks):
                self.inner.publish(chunk_topic(topic, i), chunk, retain, timeout)
            payload = manifest
        self.inner.publish(topic, payload, retain, timeout)
        if retain:  # clear the chunk topics an earlier, longer message left retained
            for i in range(len(chunks), self._retained_chunks.get(topic, 0)):
                self.inner.publish(chunk_topic(topic, i), b"", True, timeout)
            self._retained_chunks[topic] = len(chunks)

    def recv(self, timeout: float | None = None) -> Message | None:
        """The next whole message within ``timeout`` seconds (chunks are gathered meanwhile)."""
        if self._ready:
            return self._ready.pop(0)
        if (fetched := self._retry_fetches()) is not None:
            return fetched
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if self._fetches:  # a failed fetch is tried again every RETRY_FETCH_S meanwhile
                left = RETRY_FETCH_S if left is None else min(left, RETRY_FETCH_S)
            msg = self.inner.recv(left)
            if msg is None:
                self._expire()
                if (fetched := self._retry_fetches()) is not None:
                    return fetched
                if deadline is None or time.monotonic() < deadline:
                    continue
                return None
            try:
                whole = self._take(msg)
            except PayloadError as err:
                log.warning("dropped a chunk message on %s: %s", msg.topic, err)
                self.inner.ack(msg)
                whole = None
            if whole is not None:
                return whole
            if deadline is not None and time.monotonic() >= deadline:
                return None

    def ack(self, msg: Message) -> None:
        if msg.mid:
            self.inner.ack(msg)
        elif self.spool is not None and len(msg.payload) > self.limit:
            self._unspool(hashlib.sha256(msg.payload).digest())

    def close(self) -> None:
        self.inner.close()

    # -- gathering --------------------------------------------------------------------------------
    def _take(self, msg: Message) -> Message | None:
        """``msg`` itself, or the whole message it completes, or ``None`` (held)."""
        payload = msg.payload
        if payload.startswith(REFERENCE):
            whole = self._fetch(msg, time.monotonic())  # a PayloadError is acked by recv
            self.inner.ack(msg)
            return whole
        if payload.startswith(CHUNK) and "/c/" in msg.topic:
            if len(payload) < _HEAD.size:
                raise PayloadError("a chunk shorter than its header")
            _, digest, index, count = _HEAD.unpack_from(payload)
            topic = msg.topic.rsplit("/c/", 1)[0]
            if not 0 <= index < count <= MAX_CHUNKS or msg.topic != chunk_topic(topic, index):
                raise PayloadError(f"chunk {index} of {count} on {msg.topic}")
            transfer = self._transfer(digest, topic, msg.retained)
            self._spool_put(digest, f"{index}.chunk", msg)
            transfer.chunks[index] = payload[_HEAD.size :]
        elif payload.startswith(MANIFEST):
            manifest = _manifest(payload)
            digest = bytes.fromhex(manifest["sha256"])
            transfer = self._transfer(digest, msg.topic, msg.retained)
            self._spool_put(digest, "manifest", msg)
            transfer.manifest = manifest
        else:
            return msg
        self.inner.ack(msg)
        try:
            return self._complete(digest)
        except PayloadError as err:
            log.warning("dropped a transfer on %s: %s", msg.topic, err)
            return None

    def _fetch(self, msg: Message, since: float) -> Message | None:
        """The message a reference stands for; a failed fetch is tried again on later calls
        to :meth:`recv` until ``timeout_s`` has passed."""
        if not self.blob_url:
            raise PayloadError("a push by reference, but no blob_url is configured to fetch it")
        digest, size = read_reference(msg.payload)
        try:
            return Message(msg.topic, fetch(self.blob_url, digest, size), msg.retained)
        except TransportError as err:
            if time.monotonic() - since > self.timeout_s:
                log.warning("gave up fetching the push on %s: %s", msg.topic, err)
            else:
                log.warning("fetching the push on %s failed (%s); trying again", msg.topic, err)
                self._fetches.append((msg, since))
            return None

    def _retry_fetches(self) -> Message | None:
        pending, self._fetches = self._fetches, []
        for i, (msg, since) in enumerate(pending):
            got = self._fetch(msg, since)
            if got is not None:
                self._fetches += pending[i + 1 :]
                return got
        return None

    def _transfer(self, digest: bytes, topic: str, retained: bool) -> _Transfer:
        if digest not in self._transfers:
            if len(self._transfers) >= MAX_TRANSFERS:
                oldest = min(self._transfers, key=lambda d: self._transfers[d].started)
                self._drop(oldest, "too many transfers at once")
            self._transfers[digest] = _Transfer(topic, retained)
        transfer = self._transfers[digest]
        transfer.retained = transfer.retained or retained
        return transfer

    def _complete(self, digest: bytes) -> Message | None:
        transfer = self._transfers[digest]
        manifest = transfer.manifest
        if manifest is None or len(transfer.chunks) < len(manifest["chunks"]):
            return None
        for i, expected in enumerate(manifest["chunks"]):
            data = transfer.chunks.get(i)
            if data is None or hashlib.sha256(data).hexdigest() != expected:
                transfer.chunks.pop(i, None)  # a bad or stray chunk: wait for a good copy
                log.warning("chunk %d of %s does not match its manifest", i, transfer.topic)
                return None
        payload = b"".join(transfer.chunks[i] for i in range(len(manifest["chunks"])))
        del self._transfers[digest]
        if len(payload) != manifest["size"] or hashlib.sha256(payload).digest() != digest:
            self._unspool(digest)
            raise PayloadError(f"chunks on {transfer.topic} do not add up to their manifest")
        return Message(transfer.topic, payload, transfer.retained)

    def _expire(self) -> None:
        now = time.monotonic()
        for digest in [d for d, t in self._transfers.items() if now - t.started > self.timeout_s]:
            self._drop(digest, f"incomplete after {self.timeout_s:.0f} s")

    def _drop(self, digest: bytes, why: str) -> None:
        transfer = self._transfers.pop(digest)
        total = len(transfer.manifest["chunks"]) if transfer.manifest else "?"
        log.warning(
            "dropped a transfer on %s (%d of %s chunks): %s",
            transfer.topic,
            len(transfer.chunks),
            total,
            why,
        )
        self._unspool(digest)

    # -- the spool (a server that acknowledges by hand) -------------------------------------------
    def _spool_put(self, digest: bytes, name: str, msg: Message) -> None:
        if self.spool is None:
            return
        folder = self.spool / digest.hex()
        folder.mkdir(parents=True, exist_ok=True)
        head = json.dumps({"topic": msg.topic, "retained": msg.retained}).encode() + b"\n"
        atomic_write(folder / name, head + msg.payload)

    def _unspool(self, digest: bytes) -> None:
        if self.spool is None:
            return
        folder = self.spool / digest.hex()
        for path in folder.glob("*"):
            path.unlink(missing_ok=True)
        if folder.exists():
            folder.rmdir()

    def _load_spool(self) -> None:
        assert self.spool is not None
        self.spool.mkdir(parents=True, exist_ok=True)
        for path in sorted(self.spool.glob("*/*")):
            head, _, payload = path.read_bytes().partition(b"\n")
            try:
                meta = json.loads(head)
                whole = self._take(Message(meta["topic"], payload, bool(meta["retained"])))
                if whole is not None:
                    self._ready.append(whole)
            except (ValueError, KeyError, TypeError, PayloadError) as err:
                log.warning("spooled chunk %s is unreadable (%s): dropped", path, err)
                path.unlink(missing_ok=True)
