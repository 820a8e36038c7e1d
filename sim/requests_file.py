"""``--keep-requests PATH``: every request row of a run, streamed to a columnar ``.npz`` in bounded memory.

Theory of operation
-------------------
The file is what ``numpy.savez(PATH, **log.columns())`` would write (one
``.npy`` per column of :data:`core.results.COLUMNS`, uncompressed), so
``numpy.load(PATH)["arrival"]`` reads a column back. ``savez`` needs every row
in memory; :class:`RequestsFile` is a :data:`core.results.Sink` instead: each
chunk a :class:`core.results.RequestLog` hands over is appended to one spool
file per column, next to ``PATH``, and :meth:`RequestsFile.close` writes the
archive column by column, copying each spool file in blocks (a ``.npy`` header
needs the row count, known only at the end). Memory stays one chunk; the disk
holds the rows twice for a moment. The archive is written under a temporary
name and renamed, so ``PATH`` is either the whole run or absent.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import IO

import numpy as np

from core.results import COLUMNS, Columns

__all__ = ["RequestsFile", "RequestsFileError"]


class RequestsFileError(ValueError):
    """The file cannot be written (the message names the path and why)."""


class RequestsFile:
    """A sink writing every row it is handed to the ``.npz`` at ``path`` (see the module docstring)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise RequestsFileError(f"{self.path}: is a directory; give a file name, e.g. {self.path / 'requests.npz'}")
        try:
            self._spool = tempfile.TemporaryDirectory(prefix=f".{self.path.name}.", dir=self.path.parent or ".")
        except OSError as exc:
            raise RequestsFileError(f"{self.path}: cannot write there ({exc.strerror or exc})") from None
        self._files: dict[str, IO[bytes]] = {name: open(Path(self._spool.name) / name, "wb") for name in COLUMNS}
        self.rows = 0

    def __call__(self, chunk: Columns) -> None:
        for name, fh in self._files.items():
            np.ascontiguousarray(chunk[name], dtype=COLUMNS[name]).tofile(fh)
        self.rows += len(chunk["outcome"])

    def close(self) -> Path:
        """Write the archive and remove the spool; returns the path written."""
        partial = self.path.with_name(f".{self.path.name}.partial")
        try:
            with zipfile.ZipFile(partial, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
                for name, fh in self._files.items():
                    fh.close()
                    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(COLUMNS[name])), "fortran_order": False,
                              "shape": (self.rows,)}
                    with archive.open(f"{name}.npy", "w", force_zip64=True) as out, open(fh.name, "rb") as spool:
                        np.lib.format.write_array_header_1_0(out, header)
                        shutil.copyfileobj(spool, out, 1 << 20)
            os.replace(partial, self.path)
        finally:
            partial.unlink(missing_ok=True)
            self.discard()
        return self.path

    def discard(self) -> None:
        """Remove the spool without writing the archive (a run that failed)."""
        for fh in self._files.values():
            fh.close()
        self._spool.cleanup()
