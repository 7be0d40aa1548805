"""Near-duplicate photos: a 64-bit perceptual hash per stored image, an index that answers "seen one within d bits?",
and the hashes a run's shard files carry (so a resumed run still rejects duplicates of rows written before the
stop). No Ray here; `pipelines/preprocess_dedup.py` holds one index per run in a Ray actor that every worker asks.

The hash is the DCT pHash: the grey image at 32×32, its 8×8 lowest-frequency DCT coefficients, one bit per
coefficient (above their median or not). Re-encoding, resizing, brightness and colour changes leave it (nearly)
the same; different photos differ in about half of the 64 bits.
"""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

DEFAULT_DUPLICATE_DISTANCE = 6  # copies re-encoded/resized/dimmed: 0 bits, a 5% crop 6; different photos ≥ 20
MAX_DUPLICATE_DISTANCE = 32  # half the bits: beyond that, two unrelated photos count as duplicates
HASH_KEY = b"facediffuser_phash"  # shard file metadata: JSON {id: hash as 16 hex digits} of its rows

_SIZE, _KEEP = 32, 8


def _dct_matrix(size: int) -> np.ndarray:
    k, i = np.arange(size)[:, None], np.arange(size)[None, :]
    return np.cos(np.pi * (2 * i + 1) * k / (2 * size))


_DCT = _dct_matrix(_SIZE)


def perceptual_hash(image: np.ndarray) -> int:
    """The 64-bit pHash of an RGB (or grey) image, as an int in [0, 2**64)."""
    grey = Image.fromarray(np.ascontiguousarray(image)).convert("L")
    grey = grey.reduce(max(1, min(grey.size) // 128))  # box averages first: LANCZOS on the whole photo costs 3× more
    grey = grey.resize((_SIZE, _SIZE), Image.Resampling.LANCZOS)
    coefficients = (_DCT @ np.asarray(grey, np.float64) @ _DCT.T)[:_KEEP, :_KEEP].ravel()
    bits = coefficients > np.median(coefficients)
    return int("".join("1" if bit else "0" for bit in bits), 2)


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


class HashIndex:
    """The hashes of the photos kept so far, answering "is there one within `distance` bits of this one?".

    Exact, by the pigeonhole principle: the 64 bits are cut into distance + 1 chunks, and two hashes at most
    `distance` bits apart agree on at least one whole chunk, so only the entries sharing a chunk value are
    compared. The first photo of a near-duplicate group to ask is kept; a photo asking again (a retried block)
    gets the same answer as before."""

    def __init__(self, distance: int):
        if not 0 <= distance <= MAX_DUPLICATE_DISTANCE:
            raise ValueError(f"duplicate distance must be in 0..{MAX_DUPLICATE_DISTANCE}, got {distance}")
        self.distance = distance
        edges = np.linspace(0, 64, distance + 2).round().astype(int)
        self._chunks = [(int(lo), int(hi - lo)) for lo, hi in zip(edges[:-1], edges[1:])]  # (shift, bits)
        self._buckets: list[dict[int, list[str]]] = [{} for _ in self._chunks]
        self._hashes: dict[str, int] = {}  # id → hash of every kept photo

    def __len__(self) -> int:
        return len(self._hashes)

    def _keys(self, value: int):
        return ((value >> shift) & ((1 << bits) - 1) for shift, bits in self._chunks)

    def add(self, item_id: str, value: int) -> None:
        if item_id in self._hashes:
            return
        self._hashes[item_id] = value
        for bucket, key in zip(self._buckets, self._keys(value)):
            bucket.setdefault(key, []).append(item_id)

    def nearest(self, item_id: str, value: int) -> tuple[str, int] | None:
        """(the kept photo nearest to `value` within the distance, its distance in bits), ties to the smallest
        id; None when there is none. The photo's own entry (same id) does not count."""
        best = None
        for bucket, key in zip(self._buckets, self._keys(value)):
            for other in bucket.get(key, ()):
                if other == item_id:
                    continue
                bits = hamming(value, self._hashes[other])
                if bits <= self.distance and (best is None or (bits, other) < (best[1], best[0])):
                    best = (other, bits)
        return best

    def check_and_add(self, item_id: str, value: int) -> tuple[str, int] | None:
        """`nearest`, and when there is none the photo is kept: added, so that its later near-duplicates are not."""
        found = self.nearest(item_id, value)
        if found is None:
            self.add(item_id, value)
        return found


def duplicate_reason(kept_id: str, bits: int, distance: int) -> str:
    return (
        f"near duplicate of {kept_id} (perceptual hash {bits} of 64 bits apart, at most --duplicate-distance "
        f"{distance})"
    )


def hash_metadata(items: list[dict]) -> dict[bytes, bytes]:
    """The shard file metadata holding the hashes of the accepted `items` that have one ({} when none has)."""
    hashes = {i["id"]: f"{i['phash']:016x}" for i in items if not i["stage"] and i.get("phash") is not None}
    return {HASH_KEY: json.dumps(hashes, sort_keys=True).encode()} if hashes else {}


def written_hashes(shards_uri: str) -> dict[str, int]:
    """{id: hash} of the rows in the shard files under `shards_uri` (their metadata; files written without the
    near-duplicate filter carry none): what a resumed run's index starts from. Reads only the files' footers."""
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    from facediffuser.data import io as dataio

    fs, root = dataio.resolve(shards_uri)
    hashes: dict[str, int] = {}
    for info in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
        if info.type != pafs.FileType.File or info.base_name.startswith((".", "_")):
            continue
        metadata = pq.read_schema(info.path, filesystem=fs).metadata or {}
        if HASH_KEY in metadata:
            hashes.update({k: int(v, 16) for k, v in json.loads(metadata[HASH_KEY]).items()})
    return hashes
