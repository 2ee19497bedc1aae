"""The proposal cache: round trip, atomic writes, damage detected, content and settings keys."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest

from proposals.cache import ProposalCache, cache_dir, file_sha256
from proposals.runner import run_proposals
from proposals.selective_search import ProposalSettings

BOXES = np.array([[0, 0, 9, 9], [1.5, 2, 30, 40]], dtype=np.float32)


@pytest.fixture
def cache(tmp_path):
    return ProposalCache.for_dataset(tmp_path / "work", "demo", ProposalSettings())


def test_round_trip_and_layout(cache, tmp_path):
    cache.store("000001", "ab" * 32, BOXES, 0.25, 64, 48)
    entry = cache.load("000001", "ab" * 32)
    np.testing.assert_array_equal(entry.boxes, BOXES)
    assert entry.boxes.dtype == np.float32
    assert (entry.seconds, entry.width, entry.height) == (0.25, 64, 48)
    assert cache.directory == tmp_path / "work" / "proposals" / f"demo-{ProposalSettings().key()}"
    assert (cache.directory / "000001.npz").is_file()
    assert json.loads((cache.directory / "settings.json").read_text())["settings"]["mode"] == "fast"
    with np.load(cache.directory / "000001.npz", allow_pickle=False) as npz:   # documented format
        assert set(npz.files) == {"boxes", "meta"}
        meta = json.loads(npz["meta"].tobytes())
    assert meta["image_sha256"] == "ab" * 32 and meta["count"] == 2 and meta["format"] == 1
    empty = np.zeros((0, 4), np.float32)
    cache.store("none", "cd" * 32, empty, 0.1, 10, 10)
    assert cache.load("none", "cd" * 32).boxes.shape == (0, 4)


def test_odd_image_ids_get_safe_distinct_files(cache):
    ids = ["a/b", "a_b", "../x", "..", "white space", "ünï"]
    paths = {cache.path(i) for i in ids}
    assert len(paths) == len(ids) and all(p.parent == cache.directory for p in paths)
    for i in ids:
        cache.store(i, "00" * 32, BOXES, 1.0, 50, 50)
        assert cache.load(i, "00" * 32) is not None


def test_missing_and_stale_entries_are_misses(cache):
    assert cache.load("nope", "00" * 32) is None
    cache.store("img", "00" * 32, BOXES, 1.0, 50, 50)
    assert cache.load("img", "11" * 32) is None          # other image bytes
    other = ProposalCache(cache.directory, ProposalSettings(max_proposals=5))  # same folder, forced
    assert other.load("img", "00" * 32) is None          # other settings
    assert cache.damaged == [] and other.damaged == []


def test_write_is_atomic(cache, monkeypatch):
    cache.store("img", "00" * 32, BOXES, 1.0, 50, 50)
    before = cache.path("img").read_bytes()

    def crash(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(Exception):
        cache.store("img", "00" * 32, BOXES * 2, 2.0, 50, 50)
    monkeypatch.undo()
    assert cache.path("img").read_bytes() == before        # the old entry is intact
    assert [p.name for p in cache.directory.iterdir() if p.name.endswith(".tmp")] == []


@pytest.mark.parametrize("damage", ["truncate", "flip_box_byte", "garbage", "empty", "pickle",
                                    "wrong_checksum"])
def test_damaged_entry_is_detected(cache, damage):
    cache.store("img", "00" * 32, BOXES, 1.0, 50, 50)
    path = cache.path("img")
    raw = bytearray(path.read_bytes())
    if damage == "truncate":
        path.write_bytes(bytes(raw[: len(raw) // 2]))
    elif damage == "flip_box_byte":
        at = bytes(raw).find(BOXES.tobytes())
        raw[at + 5] ^= 0xFF
        path.write_bytes(bytes(raw))
    elif damage == "garbage":
        path.write_bytes(b"not a zip file at all")
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "pickle":
        buffer = io.BytesIO()
        np.savez(buffer, boxes=np.array([object()], dtype=object), meta=np.zeros(3, np.uint8))
        path.write_bytes(buffer.getvalue())
    else:   # a valid zip whose boxes do not match the recorded checksum
        with np.load(path, allow_pickle=False) as npz:
            meta = npz["meta"]
        buffer = io.BytesIO()
        np.savez(buffer, boxes=BOXES + 1, meta=meta)
        path.write_bytes(buffer.getvalue())
    assert cache.load("img", "00" * 32) is None
    assert cache.damaged == ["img"]


def test_runner_recomputes_damaged_and_changed_images(tmp_path, write_drawn):
    paths = write_drawn(tmp_path / "images", 2)
    settings = ProposalSettings()
    cache = ProposalCache.for_dataset(tmp_path / "work", "drawn", settings)
    items = [(p.stem, p) for p in paths]
    first = run_proposals(items, settings, cache, jobs=1, progress=False)
    assert first.computed == 2
    # damage one entry, change the other image's bytes (same name)
    cache.path("img0").write_bytes(cache.path("img0").read_bytes()[:100])
    write_drawn(tmp_path / "other", 1, start=5)[0].replace(paths[1])
    cache = ProposalCache.for_dataset(tmp_path / "work", "drawn", settings)
    second = run_proposals(items, settings, cache, jobs=1, progress=False)
    assert second.computed == 2 and second.damaged == ["img0"]
    np.testing.assert_array_equal(second.results[0].boxes, first.results[0].boxes)
    assert not np.array_equal(second.results[1].boxes, first.results[1].boxes)
    third = run_proposals(items, settings, cache, jobs=1, progress=False)
    assert third.cached == 2 and third.computed == 0
    assert cache.load("img1", file_sha256(paths[1])) is not None


def test_settings_change_gives_another_folder(tmp_path):
    a = cache_dir(tmp_path, "VOC2007", ProposalSettings())
    b = cache_dir(tmp_path, "VOC2007", ProposalSettings(mode="quality"))
    c = cache_dir(tmp_path, "other set", ProposalSettings())
    assert len({a, b, c}) == 3 and c.name.startswith("other_set-")


def test_stale_temporaries_are_cleaned(tmp_path):
    settings = ProposalSettings()
    folder = cache_dir(tmp_path, "d", settings)
    folder.mkdir(parents=True)
    old, new = folder / ".img.npz.abc.tmp", folder / ".img2.npz.def.tmp"
    old.write_bytes(b"x")
    new.write_bytes(b"x")
    os.utime(old, (0, 0))
    ProposalCache(folder, settings)
    assert not old.exists() and new.exists()


def _ranked(n: int) -> np.ndarray:
    """`n` distinct boxes in rank order."""
    i = np.arange(n, dtype=np.float32)[:, None]
    return np.concatenate([i, i, i + 20, i + 30], axis=1)


def test_a_longer_list_serves_a_shorter_one_as_its_prefix(tmp_path):
    work = tmp_path / "work"
    long = ProposalCache.for_dataset(work, "photos", ProposalSettings(max_proposals=50))
    long.store("img", "ab" * 32, _ranked(50), 1.5, 80, 60)
    short = ProposalCache.for_dataset(work, "photos", ProposalSettings(max_proposals=20))
    entry = short.load("img", "ab" * 32)
    np.testing.assert_array_equal(entry.boxes, _ranked(20))
    assert (entry.seconds, entry.width, entry.height) == (1.5, 80, 60)
    assert short.path("img").is_file()                       # stored in its own folder too
    long.path("img").unlink()
    np.testing.assert_array_equal(short.load("img", "ab" * 32).boxes, _ranked(20))
    assert short.load("img", "cd" * 32) is None              # other image bytes: a miss


def test_only_longer_lists_of_the_same_dataset_and_settings_serve(tmp_path):
    work = tmp_path / "work"
    for name, settings in [("photos", ProposalSettings(max_proposals=10)),        # shorter
                           ("photos", ProposalSettings(max_proposals=50, min_size=5)),
                           ("photos2", ProposalSettings(max_proposals=50)),       # other set
                           ("photos-x", ProposalSettings(max_proposals=50))]:
        ProposalCache.for_dataset(work, name, settings).store("img", "ab" * 32, _ranked(10),
                                                             1.0, 80, 60)
    cache = ProposalCache.for_dataset(work, "photos", ProposalSettings(max_proposals=20))
    assert cache.longer == () and cache.load("img", "ab" * 32) is None
    # a folder whose settings file is damaged is passed over, not an error
    bad = cache_dir(work, "photos", ProposalSettings(max_proposals=99))
    bad.mkdir(parents=True)
    (bad / "settings.json").write_text("{not json")
    assert ProposalCache.for_dataset(work, "photos", ProposalSettings(max_proposals=20)).longer == ()


def test_the_pipeline_reads_proposals_that_sppnet_proposals_made(tmp_path, monkeypatch):
    """train / eval (`dataset_proposals`, the preset's 500) reuse `sppnet proposals`' 2000."""
    from data.voc import open_voc
    from detection import pipeline
    from proposals import runner

    root = tmp_path / "voc"
    (root / "JPEGImages").mkdir(parents=True)
    (root / "Annotations").mkdir()
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "ImageSets" / "Main" / "test.txt").write_text("a\n")
    (root / "JPEGImages" / "a.jpg").write_bytes(b"not searched: served from the cache")
    (root / "Annotations" / "a.xml").write_text(
        "<annotation><size><width>80</width><height>60</height></size><object><name>cat</name>"
        "<bndbox><xmin>1</xmin><ymin>1</ymin><xmax>20</xmax><ymax>20</ymax></bndbox></object>"
        "</annotation>")
    dataset = open_voc(root, "test")
    long = ProposalCache.for_dataset(tmp_path / "w", dataset.name, ProposalSettings())
    long.store("a", file_sha256(root / "JPEGImages" / "a.jpg"), _ranked(700), 2.0, 80, 60)
    monkeypatch.setattr(runner, "_run_inline", lambda *a, **k: pytest.fail("searched again"))
    boxes, run = pipeline.dataset_proposals(dataset, tmp_path / "w", 500, jobs=1,
                                            progress=False)
    np.testing.assert_array_equal(boxes["a"], _ranked(500))
    assert run.cached == 1
