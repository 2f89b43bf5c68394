"""Paths that are local folders or object storage (``gs://``, ``s3://``), one type for both.

A local path stays a ``pathlib.Path``; a remote one becomes an ``etils.epath.Path``, which
reaches gs:// through gcsfs (``EPATH_USE_TF=false``, set below unless the environment says
otherwise; with ``true`` epath uses TensorFlow's gfile) and s3:// through s3fs (not installed
here). Both have the same methods (``/``, ``read_text``, ``write_bytes``,
``iterdir``, ``is_dir``, ``rename``, ``unlink``), so callers write one code path. Checkpoint
arrays never pass through here: orbax writes them with tensorstore's own gcs driver.

What differs on object storage, and is handled here:
- no rename is atomic, but a single object put is: small files are written in one put;
- no append: logs are kept in a local staging folder and uploaded whole (``Mirror``);
- no free space to ask for: a quota or permission problem surfaces as a failed write.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

# epath sends gs:// to TensorFlow's gfile whenever TensorFlow is installed (it is: seqio needs
# it) unless told otherwise, and decides once per process, at its first gs:// operation. One
# client for all our gs:// I/O: gcsfs, the one the tests run against a GCS API server.
os.environ.setdefault("EPATH_USE_TF", "false")

from etils import epath  # noqa: E402

REMOTE_PREFIXES = ("gs://", "s3://")
# GCS allows about one write per second to the same object name; logs are uploaded at most
# this often (and when the run ends), so a week-long run never hits that limit.
SYNC_SECONDS = 10.0


def is_remote(path: str | os.PathLike) -> bool:
    """True for ``gs://`` and ``s3://`` paths (object storage)."""
    return str(path).startswith(REMOTE_PREFIXES)


def as_path(path: str | os.PathLike) -> epath.Path:
    """``path`` as a Path: ``pathlib.Path`` for local paths, ``epath.Path`` for remote ones."""
    if isinstance(path, epath.Path) and not isinstance(path, Path):
        return path
    return epath.Path(path) if is_remote(path) else Path(path)


def absolute(path: str | os.PathLike) -> epath.Path:
    """The absolute form of a local path; a remote path as it is (``Path.absolute`` would
    prefix it with the working directory)."""
    path = as_path(path)
    return path if is_remote(path) else path.absolute()


def write_atomically(path: str | os.PathLike, data: bytes | str) -> None:
    """Readers see the old file or the new one, never half of one.

    Local: a temp file in the same folder, then ``os.replace``. Object storage: one put, which
    GCS and S3 commit whole (a rename there would be a copy plus a delete, not atomic).
    """
    path = as_path(path)
    data = data.encode() if isinstance(data, str) else data
    if is_remote(path):
        path.write_bytes(data)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def probe_write(folder: epath.Path, name: str, data: bytes) -> None:
    """Writes ``folder/name`` (fsynced on a local disk), reads it back and removes it: the
    cheapest proof that a folder or bucket prefix takes writes. Raises what the filesystem
    raises."""
    probe = folder / name
    if is_remote(folder):
        probe.write_bytes(data)
        if probe.read_bytes() != data:
            raise OSError(f"{probe} read back different bytes")
        probe.unlink()
        return
    folder.mkdir(parents=True, exist_ok=True)
    with open(probe, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    probe.unlink()


class Mirror:
    """A local staging folder whose files are uploaded to a remote folder.

    For files that grow by appending (metrics.jsonl, TensorBoard event files), which object
    storage cannot append to: writers append locally, ``sync`` uploads each changed file
    whole, in one put (readers of the remote copy see a complete older or newer file).
    ``pull`` names files copied down first, so a resumed run appends to what is there.
    A process killed between syncs loses at most ``SYNC_SECONDS`` of log lines.
    """

    def __init__(self, remote: epath.Path, pull: tuple[str, ...] = ()):
        self.remote = as_path(remote)
        self.local = Path(tempfile.mkdtemp(prefix="t5x-like-staging-"))
        self._sent: dict[str, tuple[int, int]] = {}
        self._last = time.monotonic()
        for name in pull:
            if (self.remote / name).is_file():
                (self.local / name).write_bytes((self.remote / name).read_bytes())
                self._sent[name] = self._signature(self.local / name)

    @staticmethod
    def _signature(path: Path) -> tuple[int, int]:
        stat = path.stat()
        return stat.st_size, stat.st_mtime_ns

    def due(self) -> bool:
        """True when the last sync is ``SYNC_SECONDS`` old."""
        return time.monotonic() - self._last >= SYNC_SECONDS

    def sync(self) -> None:
        """Uploads every local file that changed since it was last uploaded."""
        for path in sorted(self.local.rglob("*")):
            if not path.is_file():
                continue
            name = path.relative_to(self.local).as_posix()
            signature = self._signature(path)
            if self._sent.get(name) != signature:
                (self.remote / name).write_bytes(path.read_bytes())
                self._sent[name] = signature
        self._last = time.monotonic()

    def close(self) -> None:
        """Final sync; the staging folder is removed even if the upload fails."""
        try:
            self.sync()
        finally:
            shutil.rmtree(self.local, ignore_errors=True)


# --------------------------------------------------------------------------- whole files


def crc32c_of(data_or_file) -> str:
    """CRC32C (Castagnoli) as 8 hex digits of bytes, or of a local file read in blocks: the
    checksum GCS computes for every object it stores, so a manifest that records it can be
    checked against the server's object metadata without reading the object."""
    import google_crc32c  # a dependency of gcsfs (google-cloud-storage)

    checksum = google_crc32c.Checksum()
    if isinstance(data_or_file, bytes | bytearray | memoryview):
        checksum.update(bytes(data_or_file))
    else:
        with open(data_or_file, "rb") as f:
            while block := f.read(1 << 22):
                checksum.update(block)
    return checksum.hexdigest().decode()


def listing(folder: str | os.PathLike) -> dict[str, tuple[int, str | None]]:
    """{file name: (size in bytes, crc32c as 8 hex digits or None)} of the files directly in
    ``folder`` ({} if there is none). Object storage answers with one list request per 1,000
    objects (sizes and GCS's own crc32c come with it), never a request per file; the listing
    is always fresh (fsspec's listing cache is dropped first). A local folder gives sizes only
    (its checksums would need a read)."""
    if not is_remote(folder):
        try:
            with os.scandir(folder) as entries:
                return {e.name: (e.stat().st_size, None) for e in entries if e.is_file()}
        except FileNotFoundError:
            return {}
    import base64

    import fsspec

    fs, path = fsspec.core.url_to_fs(str(folder))
    fs.invalidate_cache()
    try:
        items = fs.ls(path, detail=True)
    except FileNotFoundError:
        return {}
    found = {}
    for item in items:
        if item.get("type") != "file":
            continue
        crc = item.get("crc32c")  # GCS: base64 of the big-endian 4 bytes
        found[item["name"].rstrip("/").rsplit("/", 1)[-1]] = (
            int(item["size"]), base64.b64decode(crc).hex() if crc else None)
    return found


def invalidate_listings(path: str | os.PathLike) -> None:
    """Drops fsspec's cached listings for ``path``'s filesystem (gcsfs caches them per
    process): what other processes wrote is then seen."""
    if not is_remote(path):
        return
    import fsspec

    fsspec.core.url_to_fs(str(path))[0].invalidate_cache()


def upload(local: str | os.PathLike, remote: epath.Path) -> None:
    """Streams a local file to ``remote`` in blocks (never whole in memory). The object appears
    when the upload completes: a killed upload leaves no object, never half of one."""
    with open(local, "rb") as src, as_path(remote).open("wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 22)
