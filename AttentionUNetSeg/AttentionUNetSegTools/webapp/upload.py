"""An upload from the page, written slice by slice into a private folder.

The page sends each file in slices (ui.UPLOAD_JS), so the server holds one slice in memory, never the upload.
File names come from the client: only their last part is kept, as a plain name inside the folder, and the
upload's size and number of files are capped before a byte is written.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path, PurePosixPath

from AttentionUNetSegLib.errors import UserError

DEFAULT_MAX_UPLOAD_MB = 2048  # a 512x512x2000 CT in 16 bits is 1 GiB; its DICOM series a little more
UPLOAD_SLICE_BYTES = 4 * 2**20
MAX_UPLOAD_FILES = 20_000  # a series of several thousand DICOM slices fits; empty files cannot go on for ever
MAX_NAME_BYTES = 200  # file systems allow 255; room for the prefix that keeps equal names apart
AGAIN = "upload again with the page's file or folder button"


class Upload:
    """One upload in progress: its files, written one after another into a folder only this user can read."""

    def __init__(self, files, total_bytes, max_bytes: int):
        if not (_is_count(files) and _is_count(total_bytes)) or files == 0:
            raise _malformed("the upload's announcement is not a count of files and bytes")
        if files > MAX_UPLOAD_FILES or total_bytes > max_bytes:
            raise UserError(
                f"refused an upload of {files} files, {total_bytes / 2**20:.0f} MB",
                f"the server takes at most {MAX_UPLOAD_FILES} files and {max_bytes / 2**20:.0f} MB",
                "upload less, or start the server with a larger --max-upload-mb",
            )
        self.max_bytes, self.expected_files = max_bytes, files
        self.folder = Path(tempfile.mkdtemp(prefix="attention-unet-seg-upload-"))  # mode 0700
        self.paths: list[Path] = []
        self.names: list[str] = []
        self.received = 0
        self._file_bytes = self._file_size = 0

    def add(self, name, start, size, data) -> None:
        """One slice: a new file when ``start`` is 0, else the next bytes of the current one."""
        if not (isinstance(name, str) and _is_count(start) and _is_count(size) and isinstance(data, bytes)):
            raise _malformed("a slice is not a name, an offset, a size and bytes")
        if start == 0:
            self._begin_file(name, size)
        elif start != self._file_bytes or not self.paths:
            raise _malformed(f"a slice of {self.names[-1] if self.names else 'no file'} came out of order")
        if len(data) > UPLOAD_SLICE_BYTES or self._file_bytes + len(data) > self._file_size:
            raise _malformed(f"{self.names[-1]} is longer than the page announced")
        if self.received + len(data) > self.max_bytes:
            raise UserError("refused the upload", f"it is over {self.max_bytes / 2**20:.0f} MB",
                            "upload less, or start the server with a larger --max-upload-mb")
        with self.paths[-1].open("ab") as file:
            file.write(data)
        self._file_bytes += len(data)
        self.received += len(data)

    def finish(self) -> None:
        """Every announced file arrived whole."""
        if len(self.paths) != self.expected_files or self._file_bytes != self._file_size:
            raise _malformed("the upload ended before all its files arrived")

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def _begin_file(self, name: str, size: int) -> None:
        if len(self.paths) == self.expected_files or self._file_bytes != self._file_size:
            raise _malformed("a file began before the one before it ended, or beyond the files announced")
        plain = plain_file_name(name)
        if plain is None:
            raise UserError(f"refused the upload name {name[:80]!r}", "it holds no plain file name",
                            "rename the file")
        path = self.folder / plain
        while path.exists():  # equal names from different subfolders of an uploaded folder
            path = path.with_name(f"{len(self.paths)}-{path.name}")
        path.open("xb").close()  # a new file in the private folder: never one that was there before
        self.paths.append(path)
        self.names.append(plain)
        self._file_bytes, self._file_size = 0, size


def plain_file_name(name: str) -> str | None:
    """The last part of a client's file name: "../../x" and "/etc/x" become "x" (and "C:\\y\\x" too); None when
    no plain name is left ("", ".", "..", or a name no file system takes)."""
    plain = PurePosixPath(name.replace("\\", "/")).name
    if plain in ("", ".", "..") or "\0" in plain or len(plain.encode(errors="replace")) > MAX_NAME_BYTES:
        return None
    return plain


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _malformed(why: str) -> UserError:
    return UserError("refused the upload", why, AGAIN)
