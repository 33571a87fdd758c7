"""A persistent, content-addressed store of bought teacher embeddings.

Why not a database: the access pattern is "append a batch once, read large batches many times",
and vectors of one teacher output all have the same size. So each *namespace* (one teacher id,
output mode, key scope and preprocessing version; answers of two namespaces never mix) is one
append-only file of fixed-size records `[32-byte key | float32 vector | crc32]`, memory-mapped
for reads, with the key -> record index rebuilt by one scan when the file is opened.

Crash safety: a record is appended and fsynced before the purchase that paid for it is settled
in the ledger. A torn tail (a crash mid-append) is cut off on open. Every record's checksum is
verified once, when it is mapped (on open, or after an append); one that does not match (disk
corruption, a partial overwrite) never enters the index, so it is bought again and never fed to
training, and reads afterwards are plain vectorised copies.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from shared.hashing import digest_parts

from client_distiller.errors import RunError

log = logging.getLogger(__name__)
KEY_BYTES = 32
CRC_BYTES = 4
CACHE_FORMAT = 1


class CacheError(RunError):
    """The cache cannot be used as asked (e.g. a namespace reopened with another dimension)."""


@dataclass(frozen=True)
class CacheNamespace:
    """Everything that changes what the teacher would answer for the same input bytes."""

    teacher_id: str
    output_mode: str = "none"
    key_scope: str = "shared"
    preprocessing: str = "server-v1"

    @property
    def digest(self) -> str:
        return digest_parts(["namespace", CACHE_FORMAT, self.teacher_id, self.output_mode, self.key_scope,
                             self.preprocessing])[:24]

    def item_key(self, kind: str, payload: bytes) -> bytes:
        """The 32-byte key of one input (kind: 'image' or 'text')."""
        return bytes.fromhex(digest_parts([self.digest, kind, payload]))


class EmbeddingCache:
    """One namespace's vectors: `get_many` / `put_many` by 32-byte content keys."""

    def __init__(self, root: Path, namespace: CacheNamespace, dim: int) -> None:
        if dim <= 0:
            raise CacheError("embedding dimension must be positive")
        self.namespace = namespace
        self.dim = dim
        self.dir = Path(root) / namespace.digest
        self.dir.mkdir(parents=True, exist_ok=True)
        self._check_meta()
        self.path = self.dir / "vectors.bin"
        self.path.touch(exist_ok=True)
        self.record_bytes = KEY_BYTES + 4 * dim + CRC_BYTES
        self._lock = open(self.dir / "lock", "a+b")
        self._index: dict[bytes, int] = {}
        self._scanned = 0  # records already read into the index
        self._mmap: np.memmap | None = None
        self._load_index()

    # ------------------------------------------------------------------ opening
    def _check_meta(self) -> None:
        meta_path = self.dir / "meta.json"
        meta = {"format": CACHE_FORMAT, "dim": self.dim, **self.namespace.__dict__}
        if meta_path.exists():
            stored = json.loads(meta_path.read_text())
            if stored.get("dim") != self.dim or stored.get("format") != CACHE_FORMAT:
                raise CacheError(f"cache namespace {self.namespace.digest} holds dim {stored.get('dim')}, not {self.dim}")
        else:
            meta_path.write_text(json.dumps(meta, indent=2))

    def _load_index(self) -> None:
        with self._locked():
            size = self.path.stat().st_size
            whole = size - size % self.record_bytes
            if whole != size:
                log.warning("cache %s: cutting a torn tail of %d bytes", self.path, size - whole)
                with open(self.path, "r+b") as f:
                    f.truncate(whole)
        self._remap()

    def _remap(self) -> None:
        count = self.path.stat().st_size // self.record_bytes
        self._mmap = (np.memmap(self.path, dtype=np.uint8, mode="r", shape=(count, self.record_bytes))
                      if count else None)
        if self._mmap is None:
            return
        # A plain ndarray view of the vector columns (not a memmap subclass): fancy indexing it is
        # one C-level gather straight into a contiguous float32 batch.
        self._vectors_view = np.asarray(self._mmap)[:, KEY_BYTES: KEY_BYTES + 4 * self.dim].view("<f4")
        body_end = KEY_BYTES + 4 * self.dim
        for offset in range(self._scanned, count):
            record = self._mmap[offset].tobytes()
            if zlib.crc32(record[:body_end]) != int.from_bytes(record[body_end:], "little"):
                log.warning("cache %s: record %d is corrupt; it will be bought again", self.path, offset)
                continue
            self._index.setdefault(record[:KEY_BYTES], offset)
        self._scanned = count

    def _locked(self) -> "_FileLock":
        return _FileLock(self._lock)

    # ------------------------------------------------------------------ reads
    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: bytes) -> bool:
        return key in self._index

    def get_many(self, keys: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
        """(vectors [N, dim] float32, found [N] bool); unknown or corrupt entries are not found.

        Every indexed record passed its checksum when it was mapped, so a read is an index
        lookup and one vectorised copy."""
        vectors = np.zeros((len(keys), self.dim), dtype=np.float32)
        if self._mmap is None or not keys:
            return vectors, np.zeros(len(keys), dtype=bool)
        index = self._index
        rows = np.fromiter((index.get(k, -1) for k in keys), dtype=np.int64, count=len(keys))
        found = rows >= 0
        if found.all():
            return self._vectors_view[rows], found
        if found.any():
            vectors[found] = self._vectors_view[rows[found]]
        return vectors, found

    # ------------------------------------------------------------------ writes
    def put_many(self, keys: Sequence[bytes], vectors: np.ndarray) -> None:
        """Append and fsync; on return the vectors survive a crash."""
        vectors = np.asarray(vectors, dtype="<f4")
        if vectors.shape != (len(keys), self.dim):
            raise CacheError(f"expected vectors of shape ({len(keys)}, {self.dim}), got {vectors.shape}")
        if not np.isfinite(vectors).all():
            raise CacheError("refusing to cache non-finite vectors")
        records = bytearray()
        for key, vector in zip(keys, vectors):
            if len(key) != KEY_BYTES:
                raise CacheError("cache keys are 32-byte digests")
            body = key + vector.tobytes()
            records += body + zlib.crc32(body).to_bytes(4, "little")
        with self._locked():
            with open(self.path, "ab") as f:
                f.write(records)
                f.flush()
                os.fsync(f.fileno())
        self._remap()

    def close(self) -> None:
        self._mmap = None
        self._lock.close()


class _FileLock:
    """An exclusive flock, so two client processes never interleave appends."""

    def __init__(self, handle: "os.PathLike | object") -> None:
        self.handle = handle

    def __enter__(self) -> None:
        fcntl.flock(self.handle.fileno(), fcntl.LOCK_EX)  # type: ignore[attr-defined]

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self.handle.fileno(), fcntl.LOCK_UN)  # type: ignore[attr-defined]


def keys_for(namespace: CacheNamespace, kind: str, payloads: Iterable[bytes]) -> list[bytes]:
    return [namespace.item_key(kind, p) for p in payloads]
