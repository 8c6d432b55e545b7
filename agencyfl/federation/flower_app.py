"""The one Flower app of a deployment, and the digest an agency pins it by.

The coordinator submits a FAB built from ``APP_PYPROJECT`` alone: its components are imported from
the agencyfl installed on each host, so no code travels. An agency accepts a run only if the FAB it
fetched is this app, byte for byte in its files: ``app_digest`` of the FAB equals the digest the
steward pinned (``pinned_digest()`` of its own installed version). A FAB that carries any other
file, or another pyproject, is refused before Flower stores, extracts or imports it.

The digest is SHA-256 over the FAB's manifest of (path, SHA-256 of the file) pairs, not over the zip
bytes: the files are what would run, and the zip's deflate output may differ between zlib builds on
different hosts while the files are the same.
"""

from __future__ import annotations

import hashlib
import io
import zipfile

APP_PYPROJECT = """\
# The Flower app the coordinator submits. Its components are imported from the agencyfl installed on
# each host, so the coordinator ships no code to the agencies (runtime installation is off).
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "agencyfl-job"
version = "1.0.0"
dependencies = []

[tool.flwr.app]
publisher = "agencyfl"

[tool.flwr.app.components]
serverapp = "agencyfl.server.app:app"
clientapp = "agencyfl.clients.app:app"

[tool.flwr.app.config]
task = "train"
requested-by = ""
spec = ""
job = ""
resume = false
connect-timeout = 600.0
authorization = ""
"""

# What a FAB of this app may hold: Flower's build writes the pyproject and a manifest, nothing else.
_ALLOWED_FILES = {"pyproject.toml", ".info/CONTENT"}
_MAX_FILE_BYTES = 1 << 20  # read nothing bigger (a zip bomb is refused by its declared size)


class AppRefused(ValueError):
    """A FAB that is not the pinned app (the message says why)."""


def app_digest(fab: bytes) -> str:
    """SHA-256 over the FAB's files (sorted paths, each with the SHA-256 of its content).

    Raises
    ------
    AppRefused
        If the bytes are not a zip, or it holds files this app never has, or an oversize file.
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(fab))
        infos = archive.infolist()
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise AppRefused(f"not a FAB (zip): {exc}") from exc
    names = sorted(info.filename for info in infos)
    extra = sorted(set(names) - _ALLOWED_FILES)
    if extra:
        shown = ", ".join(extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
        raise AppRefused(f"the FAB carries files the agencyfl app never has: {shown}")
    if len(names) != len(set(names)):
        raise AppRefused("the FAB lists a file twice")
    manifest = hashlib.sha256()
    for info in sorted(infos, key=lambda i: i.filename):
        if info.file_size > _MAX_FILE_BYTES:
            raise AppRefused(f"{info.filename} is {info.file_size} bytes, more than this app ever holds")
        try:
            content = archive.read(info)
        except (zipfile.BadZipFile, ValueError, OSError, RuntimeError) as exc:
            raise AppRefused(f"{info.filename} cannot be read: {exc}") from exc
        manifest.update(f"{info.filename}\0{hashlib.sha256(content).hexdigest()}\n".encode())
    return manifest.hexdigest()


def build_app_fab() -> bytes:
    """The FAB Flower builds from ``APP_PYPROJECT`` (as `flwr run` does on the coordinator)."""
    from flwr.cli.build import build_fab_from_files

    fab, _ = build_fab_from_files({"pyproject.toml": APP_PYPROJECT.encode()})
    return fab


def pinned_digest() -> str:
    """The digest of this installation's app: what a steward pins."""
    return app_digest(build_app_fab())
