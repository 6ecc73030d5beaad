"""Byte-level corpora and the datasets the language-model task trains on.

Corpora are byte arrays (256 tokens, one per byte value):
- `enwik8`: the first 10^8 bytes of a 2006 English Wikipedia dump (the Hutter Prize file), split 90M/5M/5M as in
  Transformer-XL and every paper since. Fetched once from the canonical archive into `data.cache_dir`; the zip is
  verified against its published SHA-256 and size, the extracted file against its exact size and header.
- `text`: any local file, read as bytes, split 90/5/5 by fraction.
- `pystdlib`: the .py sources of the running interpreter's standard library (tests and site-packages left out),
  in sorted path order and capped at `data.max_bytes`: an embedded corpus every machine has, for offline runs.

Training items are random crops of seq_len + 1 bytes whose offsets are a pure function of (seed, item index), so a
run resumed at step s, which skips the first s batches, draws exactly the crops the uninterrupted run drew, and
ranks sharded by Accelerate (rank r takes batches r, r + world, ...) see different crops. Validation items are
fixed, evenly spaced windows; the final evaluation tiles a split with non-overlapping windows.

Packing (`data.pack`): items also carry `segment_ids`, (seq_len + 1,) document ids counted from 0 at the item's
first byte, derived from where documents begin in the split (`document_starts`): pystdlib at each `# ==== path ====`
line, enwik8 at the line of each `<page>`, a text file after each run of blank lines (they end the document before
them) or after each `data.separator`. The ids are a pure function of the crop's offset, so crops stay a pure
function of (seed, index). A split's first bytes are document 0 even where the document began in the split before.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import pathlib
import re
import sys
import sysconfig
import urllib.error
import urllib.request
import zipfile

import numpy as np
import torch
from torch.utils.data import Dataset

ENWIK8_URL = "http://mattmahoney.net/dc/enwik8.zip"
# Published with the Hugging Face `enwik8` dataset's download checksums for this exact URL.
ENWIK8_ZIP_SHA256 = "547994d9980ebed1288380d652999f38a14fe291a6247c157c3d33d4932534bc"
ENWIK8_ZIP_BYTES = 36_445_475
ENWIK8_BYTES = 100_000_000
ENWIK8_HEADER = b"<mediawiki "
ENWIK8_SPLIT = (90_000_000, 5_000_000, 5_000_000)
SPLITS = ("train", "val", "test")
TEXT_FRACTIONS = (0.90, 0.05, 0.05)
_DOWNLOAD_BLOCK = 1 << 20


class DataUnavailableError(RuntimeError):
    """A corpus can neither be found locally nor downloaded."""


class ChecksumError(RuntimeError):
    """A file does not have the size or digest it is published with."""


# ---------------------------------------------------------------------------------------------- files


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_file(path: str | os.PathLike, *, size: int | None = None, sha256: str | None = None) -> None:
    """Raise ChecksumError naming the file and both values unless `path` has the expected size and digest."""
    path = pathlib.Path(path)
    seen = path.stat().st_size
    if size is not None and seen != size:
        raise ChecksumError(f"{path}: expected {size:,} bytes, found {seen:,}")
    if sha256 is not None:
        digest = sha256_file(path)
        if digest != sha256:
            raise ChecksumError(f"{path}: expected SHA-256 {sha256}, found {digest}")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a sibling tmp file, then rename: readers see the old file or the whole new one, never a part."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def download(
    url: str, dest: str | os.PathLike, *, size: int | None = None, sha256: str | None = None, hint: str = ""
) -> pathlib.Path:
    """Download `url` to `dest` with a progress bar, verify it, then rename into place. An interrupted or
    corrupt download never leaves a file at `dest` (nor a partial one beside it).

    With `size`, at most size + 1 bytes are read: a body that is longer (or a Content-Length that differs) is
    refused before the excess reaches the disk, since plain http lets anyone on the path send an endless body.
    Without `size` the Content-Length, when sent, is the cap. A wrong size or digest raises ChecksumError, a
    network failure (before or during the body) DataUnavailableError; both name the URL."""
    from tqdm.auto import tqdm

    dest = pathlib.Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    try:
        try:
            response = urllib.request.urlopen(url, timeout=30)
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise DataUnavailableError(f"could not download {url} ({e}).{hint}") from e
        with response:
            try:
                announced = int(response.headers.get("Content-Length") or 0)
            except ValueError:
                announced = 0
            # a missing, malformed or non-positive header says nothing; the size check after the body still holds
            announced = announced if announced > 0 else None
            if size is not None and announced is not None and announced != size:
                raise ChecksumError(f"{url} announces {announced:,} bytes, expected {size:,}; nothing was downloaded")
            limit = size if size is not None else announced
            digest, received = hashlib.sha256(), 0
            with (
                open(tmp, "wb") as f,
                tqdm(total=limit, unit="B", unit_scale=True, desc=f"downloading {dest.name}") as bar,
            ):
                while True:
                    # one byte past the limit is enough to know the body is too long
                    want = _DOWNLOAD_BLOCK if limit is None else min(_DOWNLOAD_BLOCK, limit + 1 - received)
                    try:
                        block = response.read(want)
                    except (OSError, http.client.HTTPException) as e:
                        # a dropped connection mid-body (IncompleteRead is no OSError) is as offline as a refused one
                        raise DataUnavailableError(
                            f"could not download {url}: the connection failed after {received:,} bytes ({e!r}).{hint}"
                        ) from e
                    if not block:
                        break
                    f.write(block)
                    digest.update(block)
                    received += len(block)
                    bar.update(len(block))
                    if limit is not None and received > limit:
                        raise ChecksumError(
                            f"{url} sent more than the expected {limit:,} bytes; stopped after {received:,}"
                        )
        if size is not None and received != size:
            raise ChecksumError(f"{url}: received {received:,} bytes, expected {size:,}")
        if sha256 is not None and digest.hexdigest() != sha256:
            raise ChecksumError(f"{url}: expected SHA-256 {sha256}, found {digest.hexdigest()}")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


# ---------------------------------------------------------------------------------------------- corpora


def _expand(path: str) -> pathlib.Path:
    return pathlib.Path(os.path.expandvars(os.path.expanduser(path)))


def _check_enwik8(data: bytes, source: str) -> bytes:
    if len(data) != ENWIK8_BYTES or not data.startswith(ENWIK8_HEADER):
        raise ChecksumError(
            f"{source} is not enwik8: expected {ENWIK8_BYTES:,} bytes starting with {ENWIK8_HEADER!r}, "
            f"found {len(data):,} bytes starting with {data[: len(ENWIK8_HEADER)]!r}"
        )
    return data


def _unzip_enwik8(zip_path: pathlib.Path) -> bytes:
    with zipfile.ZipFile(zip_path) as z:
        names = [n for n in z.namelist() if pathlib.PurePosixPath(n).name == "enwik8"]
        if not names:
            raise ChecksumError(f"{zip_path} holds no file named 'enwik8' (found {z.namelist()})")
        return z.read(names[0])


def load_enwik8(cache_dir: str = "~/.cache/cosformer", path: str = "", url: str = ENWIK8_URL) -> bytes:
    """The 10^8 bytes of enwik8, from `path` (the raw file or its zip), else the cache, else downloaded once."""
    if path:
        p = _expand(path)
        if not p.is_file():
            raise DataUnavailableError(f"data.path={path} does not exist")
        data = _unzip_enwik8(p) if zipfile.is_zipfile(p) else p.read_bytes()
        return _check_enwik8(data, str(p))
    cache = _expand(cache_dir)
    raw = cache / "enwik8"
    if raw.is_file():
        return _check_enwik8(raw.read_bytes(), str(raw))
    archive = cache / "enwik8.zip"
    if not archive.is_file():
        hint = (
            f" Download it by hand from {url} and pass data.path=/path/to/enwik8.zip (or the extracted enwik8),"
            f" or place it in {cache}."
        )
        download(url, archive, size=ENWIK8_ZIP_BYTES, sha256=ENWIK8_ZIP_SHA256, hint=hint)
    else:
        verify_file(archive, size=ENWIK8_ZIP_BYTES, sha256=ENWIK8_ZIP_SHA256)
    data = _check_enwik8(_unzip_enwik8(archive), str(archive))
    atomic_write_bytes(raw, data)
    return data


def stdlib_sources(stdlib: str | os.PathLike | None = None) -> list[pathlib.Path]:
    """The standard library's .py files in sorted relative-path order, without tests or installed packages."""
    root = pathlib.Path(stdlib or sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    files = [p for p in root.rglob("*.py") if not skip.intersection(p.relative_to(root).parts[:-1]) and p.is_file()]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def build_pystdlib(max_bytes: int, stdlib: str | os.PathLike | None = None) -> bytes:
    root = pathlib.Path(stdlib or sysconfig.get_paths()["stdlib"])
    out, total = [], 0
    for p in stdlib_sources(root):
        # a path line between files gives the model document boundaries to learn
        chunk = f"# ==== {p.relative_to(root).as_posix()} ====\n".encode() + p.read_bytes() + b"\n"
        out.append(chunk)
        total += len(chunk)
        if total >= max_bytes:
            break
    return b"".join(out)[:max_bytes]


def load_pystdlib(cache_dir: str = "~/.cache/cosformer", max_bytes: int = 20_000_000) -> bytes:
    """The embedded corpus, built once per interpreter version and cap and cached as one file."""
    version = "{}.{}.{}".format(*sys.version_info[:3])
    cached = _expand(cache_dir) / f"pystdlib-{version}-{max_bytes}.bin"
    if cached.is_file():
        return cached.read_bytes()
    data = build_pystdlib(max_bytes)
    if len(data) < min(max_bytes, 1000):  # a cap below the floor is the user's choice, not a missing stdlib
        raise DataUnavailableError(f"the standard library at {sysconfig.get_paths()['stdlib']} yielded no sources")
    try:
        atomic_write_bytes(cached, data)
    except OSError:
        pass  # a read-only cache costs a rebuild next time, nothing else
    return data


def split_bytes(data: bytes | np.ndarray, sizes: tuple[int, ...]) -> dict[str, np.ndarray]:
    arr = np.frombuffer(data, dtype=np.uint8) if isinstance(data, (bytes, bytearray)) else np.asarray(data)
    if sum(sizes) > len(arr):
        raise ValueError(f"split sizes {sizes} need {sum(sizes):,} bytes, corpus has {len(arr):,}")
    bounds = np.cumsum((0,) + tuple(sizes))
    return {name: arr[bounds[n] : bounds[n + 1]] for n, name in enumerate(SPLITS)}


def split_fractions(data: bytes | np.ndarray, fractions: tuple[float, ...] = TEXT_FRACTIONS) -> dict[str, np.ndarray]:
    n = len(data)
    n_val, n_test = int(n * fractions[1]), int(n * fractions[2])
    return split_bytes(data, (n - n_val - n_test, n_val, n_test))


def load_corpus(name: str, *, path: str = "", cache_dir: str = "~/.cache/cosformer", max_bytes: int = 20_000_000):
    """{'train', 'val', 'test'} -> uint8 arrays for a byte-level corpus name."""
    if name == "enwik8":
        return split_bytes(load_enwik8(cache_dir, path), ENWIK8_SPLIT)
    if name == "text":
        if not path:
            raise DataUnavailableError("data.name=text needs data.path=/path/to/file")
        p = _expand(path)
        if not p.is_file():
            raise DataUnavailableError(f"data.path={path} does not exist")
        return split_fractions(p.read_bytes())
    if name == "pystdlib":
        return split_fractions(load_pystdlib(cache_dir, max_bytes))
    raise ValueError(f"data.name={name!r} is not a byte-level corpus (enwik8, text, pystdlib)")


# ---------------------------------------------------------------------------------------------- documents

PYSTDLIB_HEADER = re.compile(rb"^# ==== [^\n]* ====$", re.MULTILINE)  # build_pystdlib's line before each file
ENWIK8_PAGE = re.compile(rb"<page>")
BLANK_LINES = re.compile(rb"\n(?:[ \t\r\f\v]*\n)+")  # a line end followed by one or more whitespace-only lines


def document_starts(data: np.ndarray, name: str, separator: str = "") -> np.ndarray:
    """Sorted offsets (int64) in `data` (one split) where a document begins, 0 left out (a split always begins one).

    pystdlib: each path line; enwik8: the start of each line holding `<page>` (its indentation belongs to the
    article); text: right after each occurrence of `separator` (the separator ends the document before it, as an end
    marker the model learns to predict), or without one right after each run of blank lines (which likewise end the
    paragraph before them)."""
    raw = np.asarray(data, dtype=np.uint8).tobytes()
    if name == "pystdlib":
        starts = [m.start() for m in PYSTDLIB_HEADER.finditer(raw)]
    elif name == "enwik8":
        starts = [raw.rfind(b"\n", 0, m.start()) + 1 for m in ENWIK8_PAGE.finditer(raw)]
    elif name == "text":
        pattern = re.compile(re.escape(separator.encode())) if separator else BLANK_LINES
        starts = [m.end() for m in pattern.finditer(raw)]
    else:
        raise ValueError(f"data.name={name!r} has no document boundaries (enwik8, text, pystdlib)")
    starts = np.unique(np.asarray(starts, dtype=np.int64))
    return starts[(starts > 0) & (starts < len(raw))]


def segment_ids(starts: np.ndarray, offset: int, length: int) -> torch.Tensor:
    """(length,) int32 document ids of the bytes [offset, offset + length), 0 at the first byte, +1 at each start."""
    before = np.searchsorted(starts, offset, side="right")
    ids = np.searchsorted(starts, np.arange(offset, offset + length), side="right") - before
    return torch.from_numpy(ids.astype(np.int32))


# ---------------------------------------------------------------------------------------------- datasets


def _min_length(data: np.ndarray, seq_len: int, what: str) -> None:
    if len(data) < seq_len + 1:
        raise ValueError(f"{what} has {len(data):,} bytes, fewer than data.seq_len + 1 = {seq_len + 1}")


def _item(data: np.ndarray, start: int, seq_len: int, doc_starts: np.ndarray | None) -> dict[str, torch.Tensor]:
    item = {"x": torch.from_numpy(data[start : start + seq_len + 1].astype(np.int64))}
    if doc_starts is not None:
        item["segment_ids"] = segment_ids(doc_starts, start, seq_len + 1)
    return item


class RandomCropDataset(Dataset):
    """Item i is `seq_len + 1` bytes at an offset drawn from a generator seeded by (seed, i): no hidden sampler
    state, so skipping the first n items reproduces a run exactly. The length is nominal (the trainer stops by
    step count), large enough never to wrap. With doc_starts (`document_starts`), items carry their segment ids."""

    def __init__(
        self,
        data: np.ndarray,
        seq_len: int,
        seed: int = 0,
        length: int = 1 << 40,
        doc_starts: np.ndarray | None = None,
    ):
        _min_length(data, seq_len, "the training split")
        self.data, self.seq_len, self.seed, self.length = data, seq_len, seed, length
        self.doc_starts = doc_starts

    def __len__(self) -> int:
        return self.length

    def offset(self, index: int) -> int:
        rng = np.random.Generator(np.random.Philox(key=self.seed, counter=index))
        return int(rng.integers(0, len(self.data) - self.seq_len))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return _item(self.data, self.offset(index), self.seq_len, self.doc_starts)


class WindowDataset(Dataset):
    """Fixed windows of `seq_len + 1` bytes. With `num_windows` they are evenly spaced over the split (a cheap,
    stable validation sample); without, they tile it: consecutive windows share one byte, so every byte after
    the first is predicted exactly once (the last partial window is left out); with doc_starts, except the first
    byte of each document (items carry their segment ids)."""

    def __init__(
        self, data: np.ndarray, seq_len: int, num_windows: int | None = None, doc_starts: np.ndarray | None = None
    ):
        _min_length(data, seq_len, "the evaluation split")
        self.data, self.seq_len, self.doc_starts = data, seq_len, doc_starts
        last = len(data) - seq_len - 1
        if num_windows is None:
            self.starts = np.arange(0, last + 1, seq_len)
        else:
            self.starts = np.linspace(0, last, num=max(num_windows, 1)).round().astype(np.int64)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return _item(self.data, int(self.starts[index]), self.seq_len, self.doc_starts)


def decode(tokens) -> str:
    """Bytes to printable text: invalid UTF-8 is replaced rather than raised on."""
    return bytes(int(t) for t in tokens).decode("utf-8", errors="replace")


def encode(text: str) -> torch.Tensor:
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


__all__ = [
    "ENWIK8_URL",
    "ChecksumError",
    "DataUnavailableError",
    "RandomCropDataset",
    "WindowDataset",
    "decode",
    "document_starts",
    "download",
    "encode",
    "load_corpus",
    "load_enwik8",
    "load_pystdlib",
    "segment_ids",
    "split_bytes",
    "split_fractions",
    "verify_file",
]
