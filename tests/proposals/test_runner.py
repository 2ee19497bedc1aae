"""The runner: parallel equals serial, bad images skipped, resume, Dask equals local."""

from __future__ import annotations

import numpy as np
import pytest

from data.errors import SppnetError
from proposals.cache import ProposalCache
from proposals.runner import run_proposals
from proposals.selective_search import ProposalSettings, selective_search

SETTINGS = ProposalSettings()


def _same(run_a, run_b):
    assert [r.key for r in run_a.results] == [r.key for r in run_b.results]
    for a, b in zip(run_a.results, run_b.results):
        np.testing.assert_array_equal(a.boxes, b.boxes)


@pytest.fixture
def items(drawn_paths):
    return [(p.stem, p) for p in drawn_paths]


def test_two_jobs_equal_one_job_and_direct_calls(items, tmp_path):
    from data.images import load_image

    serial = run_proposals(items, SETTINGS, None, jobs=1, progress=False)
    parallel = run_proposals(items, SETTINGS, None, jobs=2, progress=False)
    assert serial.backend == "inline" and parallel.backend == "processes"
    assert parallel.workers == 2
    _same(serial, parallel)
    for result, (_, path) in zip(serial.results, items):
        np.testing.assert_array_equal(result.boxes, selective_search(load_image(path), SETTINGS))
        assert result.seconds > 0 and (result.width, result.height) == (200, 150)
        assert not result.cached


def test_bad_images_are_reported_and_skipped(items, tmp_path, capsys):
    text = tmp_path / "notes.jpg"
    text.write_text("this is not a picture")
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(items[0][1].read_bytes()[:300])
    bad = [("notes", text), ("missing", tmp_path / "missing.jpg"), ("cut", truncated)]
    cache = ProposalCache.for_dataset(tmp_path / "w", "mixed", SETTINGS)
    run = run_proposals(items[:1] + bad + items[1:], SETTINGS, cache, jobs=1, progress=True)
    assert [r.key for r in run.results] == [k for k, _ in items]
    assert [e.key for e in run.errors] == ["notes", "missing", "cut"]
    assert str(run.errors[0]).startswith(f"{text}: ")
    assert "not a recognised image" in str(run.errors[0])
    assert "no such file" in str(run.errors[1])
    assert "skipped" in capsys.readouterr().err


def test_resume_computes_only_what_is_missing(items, tmp_path):
    cache = ProposalCache.for_dataset(tmp_path / "w", "drawn", SETTINGS)
    partial = run_proposals(items[:2], SETTINGS, cache, jobs=1, progress=False)
    assert partial.computed == 2
    full = run_proposals(items, SETTINGS, cache, jobs=2, progress=False)
    assert (full.cached, full.computed) == (2, 1)
    assert full.backend == "inline"          # one missing image: no pool needed
    again = run_proposals(items, SETTINGS, cache, jobs=2, progress=False)
    assert (again.cached, again.computed, again.backend) == (3, 0, "cache")
    assert [r.cached for r in again.results] == [True] * 3
    _same(full, again)
    assert [r.seconds for r in full.results] == [r.seconds for r in again.results]


def test_duplicate_keys_and_bad_jobs_are_refused(items):
    with pytest.raises(ValueError):
        run_proposals(items + items[:1], SETTINGS, None, progress=False)
    with pytest.raises(SppnetError):
        run_proposals(items, SETTINGS, None, jobs=0, progress=False)


def test_dask_cluster_gives_the_same_boxes_and_fills_the_cache(items, tmp_path):
    distributed = pytest.importorskip("dask.distributed")
    local = run_proposals(items, SETTINGS, None, jobs=1, progress=False)
    cache = ProposalCache.for_dataset(tmp_path / "w", "drawn", SETTINGS)
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster:
        remote = run_proposals(items, SETTINGS, cache, scheduler=cluster.scheduler_address,
                               progress=False)
    assert remote.backend == "dask" and remote.computed == 3
    _same(local, remote)
    served = run_proposals(items, SETTINGS, cache, jobs=1, progress=False)
    assert served.cached == 3
    _same(local, served)


def test_unreachable_scheduler_is_a_user_error(items, monkeypatch):
    import proposals.runner

    monkeypatch.setattr(proposals.runner, "DASK_CONNECT_TIMEOUT", "1s")
    with pytest.raises(SppnetError, match="Dask scheduler"):
        run_proposals(items, SETTINGS, None, scheduler="tcp://127.0.0.1:9", progress=False)


def test_stored_orientation_reads_the_stored_pixels_and_caches_apart(drawn_paths, tmp_path):
    # an EXIF-turned photo: its proposals in the frame asked for, each frame cached on its own
    from PIL import Image

    from data.images import load_image

    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "turned.jpg"
    with Image.open(drawn_paths[0]) as drawn:
        drawn.save(path, quality=95, exif=exif.tobytes())
    cache = ProposalCache.for_dataset(tmp_path / "w", "turned", SETTINGS)
    turned = run_proposals([("a", path)], SETTINGS, cache, jobs=1, progress=False)
    stored = run_proposals([("a", path)], SETTINGS, cache, jobs=1, progress=False,
                           stored_orientation={"a"})
    assert (turned.results[0].width, turned.results[0].height) == (150, 200)
    assert (stored.results[0].width, stored.results[0].height) == (200, 150)
    assert stored.computed == 1           # not served the turned frame's boxes
    np.testing.assert_array_equal(stored.results[0].boxes, selective_search(
        load_image(path, exif_orientation=False), SETTINGS))
    again = run_proposals([("a", path)], SETTINGS, cache, jobs=1, progress=False,
                          stored_orientation={"a"})
    assert again.cached == 1
    np.testing.assert_array_equal(again.results[0].boxes, stored.results[0].boxes)
