"""The prepared token store: a task's tokenised documents, addressable by index.

Written once by ``t5x-like prepare`` (``t5x_like/prepare.py``), read at random by Grain
(``data/store_input.py``). One store serves every objective and sequence length: it holds
documents (the task's examples after tokenisation, EOS appended), not chunks of one length.

Layout of ``DIR`` (several tasks and splits side by side)::

    DIR/<task>/<split>/manifest.json                  written last: its presence = complete
    DIR/<task>/<split>/shard-00003-of-00008.array_record   one record per document
    DIR/<task>/<split>/shard-00003-of-00008.index.npy      int64 [n, 2]: tokens, source index

Order: source example j goes to shard ``h(seed, j) % num_shards`` and, inside it, shards are
sorted by ``h(seed, j)``: documents are shuffled once, by a seed recorded in the manifest,
whatever the number of workers that wrote them (so the local and Beam writers agree byte for
byte). The source index kept per document lets readers walk documents in source order (the
sentence-pair layouts, whose documents are runs of consecutive examples).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property

import numpy as np
from etils import epath

from t5x_like import storage
from t5x_like.errors import UserError

FORMAT = "t5x_like.token_store"
VERSION = 1
MANIFEST = "manifest.json"
# One record per ArrayRecord chunk: random access reads exactly one document.
RECORD_OPTIONS = "group_size:1,uncompressed"
_MASK64 = (1 << 64) - 1
# How long the first read of a gs:// store may take before it is called stuck: ArrayRecord's
# GCS client (google-cloud-cpp) retries without end where it finds no credentials.
FIRST_READ_SECONDS = 60.0


def shard_name(index: int, count: int) -> str:
    return f"shard-{index:05d}-of-{count:05d}"


def split_dir(root: str | epath.Path, task: str, split: str) -> epath.Path:
    return epath.Path(root) / task / split


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned type that holds every id: half the bytes for vocabularies
    below 65,536 entries."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def order_keys(seed: int, source_index: np.ndarray) -> np.ndarray:
    """splitmix64(seed, j) for source indices j: the key that places each document (shard =
    key % num_shards, then ascending key inside the shard)."""
    with np.errstate(over="ignore"):
        z = (np.asarray(source_index, np.uint64)
             + np.uint64((seed * 0x9E3779B97F4A7C15) & _MASK64))
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def vocabulary_fingerprint(vocabulary) -> str:
    """sha256 of what decides the ids: the SentencePiece model and the extra ids (or, for
    other vocabularies, their type and size)."""
    h = hashlib.sha256()
    model = getattr(vocabulary, "sp_model", None)
    if model is not None:
        h.update(model)
        h.update(f"extra_ids={getattr(vocabulary, 'extra_ids', 0)}".encode())
    else:
        h.update(f"{type(vocabulary).__name__}:{vocabulary.vocab_size}".encode())
    return h.hexdigest()


def file_sha256(path: epath.Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


@dataclasses.dataclass(frozen=True)
class ShardInfo:
    name: str
    documents: int
    tokens: int
    bytes: int
    sha256: str
    index_sha256: str
    # CRC32C (8 hex digits), the checksum GCS keeps for every object: a store on gs:// is
    # checked against it from one listing, no byte downloaded ("" in stores written before)
    crc32c: str = ""
    index_crc32c: str = ""

    def files(self) -> tuple[tuple[str, int | None, str, str], ...]:
        """(file name, size or None, sha256, crc32c) of the shard's record file and index."""
        return ((self.name + ".array_record", self.bytes, self.sha256, self.crc32c),
                (self.name + ".index.npy", None, self.index_sha256, self.index_crc32c))


def read_manifest(path: epath.Path) -> dict:
    """The manifest of the store split at ``path``, or a UserError naming what is missing."""
    manifest = path / MANIFEST
    if not manifest.exists():
        raise UserError(f"{path} is not a prepared store split (no {MANIFEST}); run "
                        "`t5x-like prepare --task TASK --split SPLIT --out DIR` first, or "
                        "rerun it to finish an interrupted one")
    try:
        data = json.loads(manifest.read_text())
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{manifest} is not valid JSON; rerun `t5x-like prepare` for this "
                        "split into an empty folder") from None
    if data.get("format") != FORMAT or data.get("version") != VERSION:
        raise UserError(f"{manifest} is not a version-{VERSION} t5x-like token store (format "
                        f"{data.get('format')!r}, version {data.get('version')!r}); prepare it "
                        "again with this version")
    return data


class StoreSplit:
    """One prepared split (a local or mounted folder, or ``gs://``): its manifest, its
    per-document index and random reads.

    Opening checks, from one listing of the folder, that every shard file is there with the
    manifest's size and, on object storage, the manifest's CRC32C against the server's own
    (free: it comes with the listing). ``verify()`` (``data.store_verify``, run before anything
    compiles) checks the sha256 of every file whose content opening did not already check:
    on a local disk every file; on gs:// none for stores that record CRC32C. So no host
    downloads the store to start, however many hosts start.
    """

    def __init__(self, root: str | epath.Path, task: str, split: str):
        if str(root).startswith("s3://"):
            raise UserError(f"data.store={root}: ArrayRecord reads local files and gs:// "
                            "objects, not s3://; copy the store to gs:// or mount the bucket "
                            "and point data.store at the mount")
        self.path = split_dir(root, task, split)
        self.task, self.split = task, split
        self.manifest = read_manifest(self.path)
        self.dtype = np.dtype(self.manifest["dtype"])
        self.shards = [ShardInfo(**s) for s in self.manifest["shards"]]
        self._content_checked: set[str] = set()
        have = storage.listing(self.path)
        for shard in self.shards:
            for name, size, _, crc in shard.files():
                if name not in have:
                    raise UserError(f"store {self.path} is damaged: {name} is missing; "
                                    "restore it or prepare the split again")
                length, server_crc = have[name]
                if size is not None and length != size:
                    raise UserError(f"store {self.path} is damaged: {name} holds {length} "
                                    f"bytes, the manifest says {size}; restore it or prepare "
                                    "the split again")
                if crc and server_crc:
                    if crc != server_crc:
                        raise UserError(f"store {self.path} is damaged: {name} does not "
                                        "match its checksum in the manifest (crc32c "
                                        f"{server_crc}, expected {crc}); restore it or "
                                        "prepare the split again")
                    self._content_checked.add(name)
        if storage.is_remote(self.path):
            self._first_read()

    def _first_read(self) -> None:
        """Reads one record through ArrayRecord's GCS client, so that a client that cannot
        authenticate (it then retries silently for a long time) or is refused stops the run
        in one sentence instead of a hang at the first batch. The read runs on a daemon
        thread of its own (not Grain's pool, whose threads the interpreter joins at exit)."""
        import threading

        shard = next((s for s in self.shards if s.documents), None)
        if shard is None:
            return
        name = shard.name + ".array_record"
        outcome: list = []

        def read() -> None:
            from array_record.python.array_record_module import ArrayRecordReader

            try:
                reader = ArrayRecordReader(str(self.path / name), "readahead_buffer_size:0")
                outcome.append(reader.read([0]))
                reader.close()
            except Exception as e:  # noqa: BLE001  (reported below in one sentence)
                outcome.append(e)

        thread = threading.Thread(target=read, daemon=True)
        thread.start()
        thread.join(FIRST_READ_SECONDS)
        if not outcome:
            raise UserError(
                f"store {self.path}: ArrayRecord's GCS client read nothing of {name} in "
                f"{FIRST_READ_SECONDS:.0f} s; it uses Application Default Credentials (a GCP "
                "VM's service account, or `gcloud auth application-default login`, or "
                "GOOGLE_APPLICATION_CREDENTIALS) and, for an emulator, "
                "CLOUD_STORAGE_EMULATOR_ENDPOINT")
        if isinstance(outcome[0], Exception):
            lines = str(outcome[0]).strip().splitlines() or [type(outcome[0]).__name__]
            raise UserError(f"store {self.path}: ArrayRecord's GCS client cannot read {name} "
                            f"({lines[0]}); check the bucket's permissions and this "
                            "machine's credentials")

    def verify(self, threads: int = 4) -> None:
        """UserError naming the first file whose bytes differ from the manifest's sha256
        (files whose CRC32C the server vouched for at opening are not read again)."""
        def check(shard: ShardInfo) -> str | None:
            for name, _, sha, _ in shard.files():
                if name not in self._content_checked and file_sha256(self.path / name) != sha:
                    return name
            return None

        with ThreadPoolExecutor(threads) as pool:
            for bad in pool.map(check, self.shards):
                if bad:
                    raise UserError(f"store {self.path} is damaged: {bad} does not match its "
                                    "checksum in the manifest; restore it or prepare the split "
                                    "again")

    def check_vocabulary(self, vocabulary) -> None:
        want = self.manifest["vocabulary"]["fingerprint"]
        if vocabulary_fingerprint(vocabulary) != want:
            raise UserError(
                f"store {self.path} was tokenised with another vocabulary ("
                f"{self.manifest['vocabulary']['name']}) than the config's; prepare it again "
                "with the config's vocabulary or set data.vocab_path to the store's")

    # ------------------------------------------------------------------ index
    @cached_property
    def index(self) -> np.ndarray:
        """int64 [documents, 2]: (tokens, source index) in store order."""
        def load(shard: ShardInfo) -> np.ndarray:
            with (self.path / (shard.name + ".index.npy")).open("rb") as f:
                return np.load(f)

        with ThreadPoolExecutor(16) as pool:  # on object storage: latency, not bandwidth
            parts = list(pool.map(load, self.shards))
        return np.concatenate(parts) if parts else np.zeros((0, 2), np.int64)

    @property
    def num_documents(self) -> int:
        return int(self.manifest["documents"])

    @property
    def num_tokens(self) -> int:
        return int(self.manifest["tokens"])

    @cached_property
    def offsets(self) -> np.ndarray:
        """int64 [documents + 1]: where each document starts in the store-order stream."""
        return np.concatenate([[0], np.cumsum(self.index[:, 0])])

    @cached_property
    def source_order(self) -> np.ndarray:
        """Store positions of the documents in source order."""
        return np.argsort(self.index[:, 1], kind="stable")

    # ------------------------------------------------------------------ reads
    @cached_property
    def _source(self):
        import grain

        # "file[0:n]": record counts from the manifest, so no file is opened before its first
        # read; gs:// objects are read by ArrayRecord's own GCS client (google-cloud-cpp).
        files = [f"{self.path / (s.name + '.array_record')}[0:{s.documents}]"
                 for s in self.shards]
        return grain.sources.ArrayRecordDataSource(files)

    def documents(self, positions: Sequence[int]) -> list[np.ndarray]:
        """int32 token arrays of the documents at store ``positions``."""
        records = self._source.__getitems__([int(p) for p in positions])
        return [np.frombuffer(r, self.dtype).astype(np.int32) for r in records]

    def stream_slices(self, starts: Sequence[int], length: int) -> np.ndarray:
        """int32 [len(starts), length]: tokens [start, start + length) of the documents
        concatenated in store order, for each start (zero-padded where the stream ends).
        One read of the union of the documents they touch."""
        starts = np.asarray(starts, np.int64)
        out = np.zeros((len(starts), length), np.int32)
        if not len(starts):
            return out
        first = np.searchsorted(self.offsets, starts, side="right") - 1
        last = np.searchsorted(self.offsets, np.minimum(starts + length, self.num_tokens),
                               side="left")
        spans = [np.arange(a, b) for a, b in zip(first, last, strict=True)]
        wanted = np.unique(np.concatenate(spans))
        docs = dict(zip(wanted.tolist(), self.documents(wanted), strict=True))
        for row, (start, a, b) in enumerate(zip(starts, first, last, strict=True)):
            tokens = np.concatenate([docs[d] for d in range(a, b)])
            begin = start - self.offsets[a]
            piece = tokens[begin:begin + length]
            out[row, :len(piece)] = piece
        return out

    def stream_slice(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the store-order stream (fewer where it ends)."""
        length = max(min(length, self.num_tokens - start), 0)
        return self.stream_slices([start], length)[0]


def open_task_stores(root: str, names: Sequence[str], split: str, vocabulary,
                     verify: bool = True) -> list[StoreSplit]:
    """The store splits of tasks ``names``, checked (presence, sizes, vocabulary and, with
    ``verify``, checksums) before anything compiles."""
    stores = [StoreSplit(root, name, split) for name in names]
    for store in stores:
        if vocabulary is not None:
            store.check_vocabulary(vocabulary)
        if verify:
            store.verify()
    return stores
