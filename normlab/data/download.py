"""File checksums, ``MANIFEST.sha256`` checks and downloads from mirror lists."""

from __future__ import annotations

import hashlib
import http.client
import logging
import re
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from normlab.data.classification import DataError

logger = logging.getLogger(__name__)

MANIFEST_NAME = "MANIFEST.sha256"
CHUNK_SIZE = 1 << 20
DOWNLOAD_TIMEOUT_S = 60.0

# One line of `sha256sum` output: the hex digest, a space, then a space (text mode) or
# "*" (binary mode), then the file name.
_MANIFEST_LINE = re.compile(r"^([0-9a-fA-F]{64}) [ *](.+)$")


def file_digest(path: Path, algorithm: str) -> str:
    """Return the hex digest of the file at ``path`` ("md5" or "sha256")."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as stream:
        while chunk := stream.read(CHUNK_SIZE):
            digest.update(chunk)
    return digest.hexdigest()


def verify_md5(path: Path, expected: str) -> None:
    """Raise DataError unless the md5 of the file at ``path`` equals ``expected``."""
    actual = file_digest(path, "md5")
    if actual != expected:
        raise DataError(
            f"checksum mismatch for {path}: expected md5 {expected}, got {actual}; "
            f"the file is corrupt or not the original distribution file, so delete it "
            f"and download it again (--download or download=True) or replace it with the original"
        )


def read_manifest(folder: Path) -> dict[str, str]:
    """Return {relative file name: sha256} from ``folder/MANIFEST.sha256``, or {}."""
    manifest = folder / MANIFEST_NAME
    if not manifest.is_file():
        return {}
    return read_manifest_file(manifest)


def read_manifest_file(manifest: Path) -> dict[str, str]:
    """Return {relative file name: sha256} from a file in ``sha256sum`` format."""
    entries = {}
    text = manifest.read_text(encoding="utf-8", errors="replace")
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        match = _MANIFEST_LINE.match(line)
        if match is None:
            raise DataError(
                f"line {number} of {manifest} is not in sha256sum format "
                f"('<sha256>  <file name>'): {line!r}; fix or delete the manifest"
            )
        entries[match.group(2)] = match.group(1).lower()
    return entries


def verify_manifest(folder: Path) -> None:
    """Check every file listed in ``folder/MANIFEST.sha256`` that exists.

    A listed file that is missing is logged and skipped, because a copy of a dataset
    may leave out files that the loader does not read. Raises DataError on a malformed
    manifest or a sha256 mismatch.
    """
    for name, expected in read_manifest(folder).items():
        path = folder / name
        if not path.is_file():
            logger.info(
                "%s lists %s, which is missing; not checked", MANIFEST_NAME, path
            )
            continue
        actual = file_digest(path, "sha256")
        if actual != expected:
            raise DataError(
                f"checksum mismatch for {path}: {folder / MANIFEST_NAME} expects "
                f"sha256 {expected}, got {actual}; the file is corrupt or was changed, "
                f"so replace it with an intact copy"
            )


def download_file(
    filename: str,
    mirrors: Sequence[str],
    folder: Path,
    md5: str,
    algorithm: str = "md5",
) -> Path:
    """Download ``filename`` from the first mirror that serves it with the right md5.

    ``algorithm`` names the hashlib digest that ``md5`` holds, "md5" unless a source
    publishes another one such as "sha256".

    Each mirror is a base URL that ``filename`` is appended to. The file is written to
    ``folder/filename.part`` and renamed only after its md5 matches, so ``folder``
    never contains a partial or corrupt file under the final name. A mirror that fails
    or serves a file with another md5 is logged and the next one is tried.

    Raises:
        DataError: when no mirror served the file with the expected md5. The message
            lists each URL with its error or the md5 it served.
    """
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / filename
    partial = folder / f"{filename}.part"
    failures = []
    for base_url in mirrors:
        url = base_url.rstrip("/") + "/" + filename
        logger.info("downloading %s to %s", url, target)
        try:
            _fetch(url, partial)
        except (OSError, http.client.HTTPException) as error:
            partial.unlink(missing_ok=True)
            logger.warning("download of %s failed: %s", url, error)
            failures.append(f"{url}: {error}")
            continue

        actual = file_digest(partial, algorithm)
        if actual != md5:
            partial.unlink()
            logger.warning(
                "deleted %s from %s: %s %s, expected %s",
                filename, url, algorithm, actual, md5,
            )
            failures.append(
                f"{url}: checksum mismatch, expected {algorithm} {md5}, got {actual}"
            )
            continue
        partial.replace(target)
        return target

    raise DataError(
        f"could not download {filename} into {folder}: {'; '.join(failures)}. "
        f"Check the network connection, or copy the file into {folder} by hand"
    )


def _fetch(url: str, path: Path) -> None:
    """Write the body of ``url`` to ``path``, with a progress bar on a terminal."""
    # urllib.error.URLError, socket timeouts and file errors are all OSError subclasses.
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        progress = tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=Path(path).name.removesuffix(".part"),
            disable=None,
            leave=False,
        )
        with progress, open(path, "wb") as stream:
            while chunk := response.read(CHUNK_SIZE):
                stream.write(chunk)
                progress.update(len(chunk))
