"""Data: splits, checksum and size checks, downloads (atomic, verified), the offline error, the embedded corpus,
and the samplers that make resume exact and shard batches across processes."""

import hashlib
import pathlib
import zipfile

import numpy as np
import pytest
import torch

from cosformer.train import data
from cosformer.train.data import (
    ChecksumError,
    DataUnavailableError,
    RandomCropDataset,
    WindowDataset,
    build_pystdlib,
    download,
    load_corpus,
    load_enwik8,
    split_bytes,
    split_fractions,
    stdlib_sources,
    verify_file,
)

UNREACHABLE = "http://127.0.0.1:9/enwik8.zip"  # the discard port: refused at once, no network needed


def random_bytes(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


@pytest.fixture
def fake_enwik8(tmp_path, monkeypatch):
    """A 1003-byte stand-in with enwik8's header, zipped like the real archive; the module's constants follow."""
    raw = data.ENWIK8_HEADER + random_bytes(1003 - len(data.ENWIK8_HEADER))
    archive = tmp_path / "src" / "enwik8.zip"
    archive.parent.mkdir()
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("enwik8", raw)
    monkeypatch.setattr(data, "ENWIK8_BYTES", len(raw))
    monkeypatch.setattr(data, "ENWIK8_ZIP_BYTES", archive.stat().st_size)
    monkeypatch.setattr(data, "ENWIK8_ZIP_SHA256", hashlib.sha256(archive.read_bytes()).hexdigest())
    monkeypatch.setattr(data, "ENWIK8_SPLIT", (901, 51, 51))
    return raw, archive


def test_split_bytes_is_contiguous_and_sized():
    raw = random_bytes(1000, seed=1)
    splits = split_bytes(raw, (900, 50, 50))
    assert [len(splits[s]) for s in ("train", "val", "test")] == [900, 50, 50]
    assert b"".join(splits[s].tobytes() for s in ("train", "val", "test")) == raw
    with pytest.raises(ValueError, match="need 1,001 bytes"):
        split_bytes(raw, (901, 50, 50))


@pytest.mark.parametrize("n", [20, 997, 10_001])
def test_split_fractions_90_5_5(n):
    raw = random_bytes(n, seed=n)
    splits = split_fractions(raw)
    sizes = [len(splits[s]) for s in ("train", "val", "test")]
    assert sum(sizes) == n and sizes[1] == sizes[2] == int(0.05 * n)
    assert b"".join(splits[s].tobytes() for s in ("train", "val", "test")) == raw


def test_enwik8_standard_split_sizes():
    assert data.ENWIK8_SPLIT == (90_000_000, 5_000_000, 5_000_000) and sum(data.ENWIK8_SPLIT) == data.ENWIK8_BYTES


def test_verify_file_checks_size_and_digest(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(random_bytes(777, seed=2))
    digest = hashlib.sha256(p.read_bytes()).hexdigest()
    verify_file(p, size=777, sha256=digest)
    with pytest.raises(ChecksumError, match="expected 778 bytes, found 777"):
        verify_file(p, size=778)
    with pytest.raises(ChecksumError, match=f"found {digest}"):
        verify_file(p, sha256="0" * 64)


def test_download_verifies_then_renames(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(random_bytes(5000, seed=3))
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    dest = download(src.as_uri(), tmp_path / "cache" / "x.bin", size=5000, sha256=digest)
    assert dest.read_bytes() == src.read_bytes()
    # a corrupt transfer leaves nothing behind: neither the target nor a partial file
    bad = tmp_path / "cache" / "y.bin"
    with pytest.raises(ChecksumError):
        download(src.as_uri(), bad, size=5000, sha256="f" * 64)
    assert sorted(p.name for p in bad.parent.iterdir()) == ["x.bin"]


class FakeResponse:
    """What `urllib.request.urlopen` returns, serving `body` (then, if `endless`, zeros forever) and counting what
    the caller read, so a test can tell how much a download pulled from a hostile or broken server."""

    def __init__(self, body: bytes = b"", *, endless: bool = False, length: int | None = None, fail_at_end=None):
        self.body, self.endless, self.fail_at_end, self.served = body, endless, fail_at_end, 0
        self.headers = {"Content-Length": str(length)} if length is not None else {}

    def read(self, n: int = -1) -> bytes:
        assert n > 0, "a download must read in bounded blocks"
        if self.served >= len(self.body):
            if self.fail_at_end is not None:
                raise self.fail_at_end
            if not self.endless:
                return b""
            # a safety stop far past any sane cap, so that a missing cap fails the test instead of hanging it
            assert self.served < 64 << 20, "read 64 MiB from an endless stream"
            self.served += n
            return bytes(n)
        block = self.body[self.served : self.served + n]
        self.served += len(block)
        return block

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.fixture
def fake_server(monkeypatch):
    """Route `download` to a FakeResponse: `fake_server(response)` installs it and returns it."""

    def install(response: FakeResponse) -> FakeResponse:
        monkeypatch.setattr(data.urllib.request, "urlopen", lambda url, timeout=None: response)
        return response

    return install


FAKE_URL = "http://example.invalid/x.bin"


def assert_cache_untouched(cache: pathlib.Path, before: dict[str, bytes]) -> None:
    assert {p.name: p.read_bytes() for p in cache.iterdir()} == before  # no partial file, the old files as they were


@pytest.fixture
def cache_with_a_file(tmp_path):
    """A cache already holding a file at the name the failed downloads target: it must survive them unchanged."""
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "x.bin").write_bytes(b"already here")
    return cache, {"x.bin": b"already here"}


@pytest.mark.parametrize("length", [None, 5000], ids=["no-length", "lying-length"])
def test_download_stops_at_the_expected_size(cache_with_a_file, fake_server, length):
    """An endless body (announced or not) is cut off just past the expected size, not written out in full."""
    cache, before = cache_with_a_file
    body = random_bytes(5000, seed=5)
    server = fake_server(FakeResponse(body, endless=True, length=length))
    with pytest.raises(ChecksumError) as e:
        download(FAKE_URL, cache / "x.bin", size=5000, sha256=hashlib.sha256(body).hexdigest())
    assert server.served <= 5000 + (1 << 16)
    message = str(e.value)
    assert FAKE_URL in message and "5,000" in message and f"{server.served:,}" in message
    assert_cache_untouched(cache, before)


def test_download_rejects_an_announced_length_before_reading(cache_with_a_file, fake_server):
    cache, before = cache_with_a_file
    server = fake_server(FakeResponse(bytes(1 << 20), length=1 << 20))
    with pytest.raises(ChecksumError, match=r"announces 1,048,576 bytes, expected 5,000") as e:
        download(FAKE_URL, cache / "x.bin", size=5000)
    assert FAKE_URL in str(e.value) and server.served == 0
    assert_cache_untouched(cache, before)


def test_download_short_body_or_wrong_digest_names_the_url(cache_with_a_file, fake_server):
    cache, before = cache_with_a_file
    body = random_bytes(5000, seed=6)
    digest = hashlib.sha256(body).hexdigest()
    fake_server(FakeResponse(body[:3000]))
    with pytest.raises(ChecksumError, match=r"received 3,000 bytes, expected 5,000") as e:
        download(FAKE_URL, cache / "x.bin", size=5000, sha256=digest)
    assert FAKE_URL in str(e.value)
    assert_cache_untouched(cache, before)

    fake_server(FakeResponse(body))
    with pytest.raises(ChecksumError, match=f"expected SHA-256 {'f' * 64}, found {digest}") as e:
        download(FAKE_URL, cache / "x.bin", size=5000, sha256="f" * 64)
    assert FAKE_URL in str(e.value)
    assert_cache_untouched(cache, before)


def test_download_connection_lost_mid_body_is_unavailable_not_a_traceback(cache_with_a_file, fake_server):
    """A connection dropped mid-body (http.client raises IncompleteRead, which is no OSError) or a read timeout
    is the same offline condition as a refused connection: DataUnavailableError naming the URL and the hint."""
    import http.client

    cache, before = cache_with_a_file
    for failure in (http.client.IncompleteRead(b"", 2000), TimeoutError("timed out")):
        fake_server(FakeResponse(random_bytes(3000, seed=7), length=5000, fail_at_end=failure))
        with pytest.raises(DataUnavailableError, match="failed after 3,000 bytes") as e:
            download(FAKE_URL, cache / "x.bin", size=5000, hint=" Try data.path.")
        assert FAKE_URL in str(e.value) and str(e.value).endswith("Try data.path.")
        assert_cache_untouched(cache, before)


def test_offline_error_names_url_and_override(tmp_path):
    with pytest.raises(DataUnavailableError) as e:
        load_enwik8(cache_dir=str(tmp_path / "cache"), url=UNREACHABLE)
    message = str(e.value)
    assert UNREACHABLE in message and "data.path=" in message
    assert not list((tmp_path / "cache").glob("*"))  # nothing half-written


def test_enwik8_downloaded_once_then_cached(tmp_path, fake_enwik8):
    raw, archive = fake_enwik8
    cache = tmp_path / "cache"
    assert load_enwik8(cache_dir=str(cache), url=archive.as_uri()) == raw
    assert (cache / "enwik8").read_bytes() == raw
    # the second call must not touch the network
    assert load_enwik8(cache_dir=str(cache), url=UNREACHABLE) == raw
    splits = load_corpus("enwik8", cache_dir=str(cache))
    assert [len(splits[s]) for s in ("train", "val", "test")] == [901, 51, 51]
    assert splits["val"].tobytes() == raw[901:952]


def test_enwik8_from_local_path_zip_or_raw(tmp_path, fake_enwik8):
    raw, archive = fake_enwik8
    assert load_enwik8(cache_dir=str(tmp_path / "c"), path=str(archive)) == raw
    plain = tmp_path / "enwik8"
    plain.write_bytes(raw)
    assert load_enwik8(cache_dir=str(tmp_path / "c"), path=str(plain)) == raw


def test_enwik8_rejects_wrong_size_or_header(tmp_path, fake_enwik8):
    raw, _ = fake_enwik8
    short = tmp_path / "short"
    short.write_bytes(raw[:-1])
    with pytest.raises(ChecksumError, match="expected 1,003 bytes"):
        load_enwik8(path=str(short))
    wrong = tmp_path / "wrong"
    wrong.write_bytes(b"<html>" + raw[6:])
    with pytest.raises(ChecksumError, match="starting with b'<mediawiki '"):
        load_enwik8(path=str(wrong))
    with pytest.raises(DataUnavailableError, match="does not exist"):
        load_enwik8(path=str(tmp_path / "nope"))


def test_corrupt_cached_archive_is_rejected(tmp_path, fake_enwik8):
    _, archive = fake_enwik8
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "enwik8.zip").write_bytes(archive.read_bytes()[:-3] + b"xyz")
    with pytest.raises(ChecksumError, match="SHA-256"):
        load_enwik8(cache_dir=str(cache), url=UNREACHABLE)


def test_text_corpus_and_its_errors(tmp_path):
    p = tmp_path / "t.txt"
    p.write_bytes(random_bytes(2000, seed=4))
    splits = load_corpus("text", path=str(p))
    assert [len(splits[s]) for s in ("train", "val", "test")] == [1800, 100, 100]
    with pytest.raises(DataUnavailableError, match="needs data.path"):
        load_corpus("text")
    with pytest.raises(ValueError, match="not a byte-level corpus"):
        load_corpus("shapes")


def test_pystdlib_excludes_tests_and_packages_sorted_and_capped(tmp_path):
    root = tmp_path / "lib"
    files = {
        "b.py": "b = 2\n",
        "a.py": "a = 1\n",
        "pkg/z.py": "z = 26\n",
        "test/test_a.py": "assert 0\n",
        "pkg/tests/t.py": "assert 0\n",
        "site-packages/numpy/x.py": "x\n",
        "notes.txt": "not python\n",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    assert [p.relative_to(root).as_posix() for p in stdlib_sources(root)] == ["a.py", "b.py", "pkg/z.py"]
    corpus = build_pystdlib(10_000, stdlib=root)
    assert corpus == build_pystdlib(10_000, stdlib=root)
    assert corpus.index(b"a = 1") < corpus.index(b"b = 2") < corpus.index(b"z = 26")
    assert b"assert 0" not in corpus and b"not python" not in corpus
    assert build_pystdlib(20, stdlib=root) == corpus[:20]


def test_pystdlib_real_corpus_is_cached(tmp_path):
    splits = load_corpus("pystdlib", cache_dir=str(tmp_path), max_bytes=50_000)
    assert sum(len(s) for s in splits.values()) == 50_000
    (cached,) = tmp_path.glob("pystdlib-*-50000.bin")
    assert cached.stat().st_size == 50_000
    assert b"import" in splits["train"].tobytes()


def test_random_crops_are_a_function_of_seed_and_index(seed):
    corpus = np.frombuffer(random_bytes(997, seed=seed), dtype=np.uint8)
    a, b = RandomCropDataset(corpus, 33, seed=7), RandomCropDataset(corpus, 33, seed=7)
    other = RandomCropDataset(corpus, 33, seed=8)
    for i in (0, 1, 5, 123_456, 2**39):
        x = a[i]["x"]
        assert x.shape == (34,) and x.dtype == torch.long
        start = a.offset(i)
        assert 0 <= start <= len(corpus) - 34
        assert torch.equal(x, torch.from_numpy(corpus[start : start + 34].astype(np.int64)))
        assert torch.equal(x, b[i]["x"])
    starts = [a.offset(i) for i in range(200)]
    assert len(set(starts)) > 150  # not a constant or a short cycle
    assert starts != [other.offset(i) for i in range(200)]
    with pytest.raises(ValueError, match="fewer than data.seq_len"):
        RandomCropDataset(corpus[:33], 33)


@pytest.mark.parametrize("n, seq_len", [(100, 9), (1000, 32), (65, 64)])
def test_tiling_windows_predict_every_byte_once(n, seq_len):
    corpus = np.arange(n, dtype=np.int64).astype(np.uint8)
    windows = WindowDataset(corpus, seq_len)
    targets = torch.cat([windows[i]["x"][1:] for i in range(len(windows))])
    assert len(windows) == (n - 1) // seq_len
    assert torch.equal(targets, torch.from_numpy(corpus[1 : 1 + len(targets)].astype(np.int64)))


def test_evenly_spaced_validation_windows():
    corpus = np.zeros(1001, dtype=np.uint8)
    windows = WindowDataset(corpus, 10, num_windows=5)
    assert windows.starts.tolist() == [0, 248, 495, 742, 990]
    assert all(windows[i]["x"].shape == (11,) for i in range(5))


def test_processes_draw_disjoint_batches_and_skip_exactly(seed):
    """Accelerate shards the batch sampler: rank r takes batches r, r + world, ...; together they are the
    single-process stream, and skipping batches (resume) continues it exactly."""
    from accelerate.data_loader import prepare_data_loader, skip_first_batches
    from torch.utils.data import DataLoader

    corpus = np.frombuffer(random_bytes(5000, seed=seed), dtype=np.uint8)
    dataset = RandomCropDataset(corpus, 16, seed=3)

    def first_batches(loader, k):
        it = iter(loader)
        return [next(it)["x"] for _ in range(k)]

    single = first_batches(DataLoader(dataset, batch_size=4), 8)
    ranks = [
        first_batches(
            prepare_data_loader(
                DataLoader(dataset, batch_size=4), num_processes=2, process_index=r, put_on_device=False
            ),
            4,
        )
        for r in (0, 1)
    ]
    for step in range(4):
        assert not torch.equal(ranks[0][step], ranks[1][step])
        assert torch.equal(ranks[0][step], single[2 * step]) and torch.equal(ranks[1][step], single[2 * step + 1])
    resumed = first_batches(skip_first_batches(DataLoader(dataset, batch_size=4), 5), 3)
    assert all(torch.equal(x, y) for x, y in zip(resumed, single[5:8]))


def test_encode_decode_round_trip():
    text = "naïve café – λ\n"
    assert data.decode(data.encode(text).tolist()) == text
    assert data.decode([0xFF, 0x41]) == "\ufffdA"


def test_cache_dir_expands_user(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    splits = load_corpus("pystdlib", cache_dir="~/cachedir", max_bytes=5_000)
    assert len(splits["train"]) == 4_500
    assert list(pathlib.Path(tmp_path, "cachedir").glob("pystdlib-*"))


def test_pystdlib_small_cap_is_not_mistaken_for_a_missing_stdlib(tmp_path):
    """A cap under the 1000-byte sanity floor is honoured, not reported as a standard library with no sources."""
    assert len(data.load_pystdlib(str(tmp_path), max_bytes=500)) == 500


# ---------------------------------------------------------------------------------------------- packing


def _crop_ids_reference(doc_of_byte: list[int], offset: int, length: int) -> list[int]:
    """Segment ids written out: the document of each byte, counted from the crop's first byte's document."""
    return [doc_of_byte[offset + t] - doc_of_byte[offset] for t in range(length)]


def test_pystdlib_documents_begin_at_the_path_lines(tmp_path, seed):
    root = tmp_path / "lib"
    texts = {
        "a.py": "a = 1\nx = '# ==== not a path line ===='\n",
        "b.py": "\n\nb = 2\n" * 5,
        "pkg/c.py": "c = 3\n" * 9,
    }
    for name, text in texts.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    corpus = np.frombuffer(build_pystdlib(10_000, stdlib=root), dtype=np.uint8)
    doc_of_byte = []
    for doc, name in enumerate(sorted(texts)):  # the corpus's order, one header line and a newline per file
        doc_of_byte += [doc] * len(f"# ==== {name} ====\n{texts[name]}\n".encode())
    assert len(doc_of_byte) == len(corpus)
    starts = data.document_starts(corpus, "pystdlib")
    assert starts.tolist() == [doc_of_byte.index(1), doc_of_byte.index(2)]
    crops = RandomCropDataset(corpus, 20, seed=seed, doc_starts=starts)
    for i in range(30):
        item, offset = crops[i], crops.offset(i)
        assert item["segment_ids"].dtype == torch.int32 and item["segment_ids"].shape == (21,)
        assert item["segment_ids"].tolist() == _crop_ids_reference(doc_of_byte, offset, 21)
    assert "segment_ids" not in RandomCropDataset(corpus, 20, seed=seed)[0]


def test_enwik8_documents_begin_at_the_page_lines():
    pages = ["<mediawiki>\n  <siteinfo>x</siteinfo>\n", "  <page>\n    <title>A</title>\n  </page>\n"]
    pages += ["  <page>\n    <text>b &lt;page&gt;</text>\n  </page>\n", "  <page>\n  </page>\n</mediawiki>\n"]
    corpus = np.frombuffer("".join(pages).encode(), dtype=np.uint8)
    bounds = np.cumsum([len(p) for p in pages])[:-1].tolist()
    assert data.document_starts(corpus, "enwik8").tolist() == bounds
    windows = WindowDataset(corpus, 15, doc_starts=data.document_starts(corpus, "enwik8"))
    doc_of_byte = [sum(b <= t for b in bounds) for t in range(len(corpus))]
    for w in range(len(windows)):
        got = windows[w]["segment_ids"].tolist()
        assert got == _crop_ids_reference(doc_of_byte, int(windows.starts[w]), 16)


def test_text_documents_split_on_blank_lines_or_the_separator():
    text = b"one\ntwo\n\n\nthree\n \t\nfour\nfive\n\n"
    corpus = np.frombuffer(text, dtype=np.uint8)
    # the blank lines end the paragraph before them; a trailing run begins no document
    assert data.document_starts(corpus, "text").tolist() == [text.index(b"three"), text.index(b"four")]
    text = b"a<|end|>bb<|end|><|end|>c<|end|>"
    corpus = np.frombuffer(text, dtype=np.uint8)
    assert data.document_starts(corpus, "text", separator="<|end|>").tolist() == [
        8,
        17,
        24,
    ]  # an empty document: the separator alone
    ids = data.segment_ids(data.document_starts(corpus, "text", separator="<|end|>"), 6, 12).tolist()
    assert ids == [0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2]
