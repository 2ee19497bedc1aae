"""VOC result files: 1-based on disk, 0-based in memory, atomic, strict parsing."""

from __future__ import annotations

import numpy as np
import pytest

from data.errors import ResultFileError
from data.results import (ClassDetections, detections_by_class, read_result_file,
                          read_voc_results, result_file_name, write_voc_results)


def test_round_trip_is_one_based_on_disk(tmp_path):
    dets = {"cat": ClassDetections(["a", "b"], [0.5, 0.25], [[0, 0, 9, 19], [10.5, 1, 20, 30]]),
            "dog": ClassDetections()}
    write_voc_results(tmp_path, "test", dets)
    assert result_file_name("test", "cat") == "comp4_det_test_cat.txt"
    lines = (tmp_path / "comp4_det_test_cat.txt").read_text().splitlines()
    assert lines[0].split() == ["a", "0.5", "1.000", "1.000", "10.000", "20.000"]
    assert (tmp_path / "comp4_det_test_dog.txt").read_text() == ""
    back, missing = read_voc_results(tmp_path, "test", ["cat", "dog", "bird"])
    assert missing == ["bird"] and len(back["bird"]) == 0
    assert back["cat"].image_ids == ["a", "b"]
    np.testing.assert_allclose(back["cat"].boxes, dets["cat"].boxes)
    np.testing.assert_allclose(back["cat"].scores, [0.5, 0.25])
    assert not list(tmp_path.glob(".*tmp"))        # no temporary files left behind


def test_a_class_name_with_path_separators_stays_in_the_folder(tmp_path):
    """Class names come from annotations: `a/b` or `../x` never name another folder."""
    out = tmp_path / "out"
    dets = {name: ClassDetections(["i"], [0.5], [[0, 0, 1, 1]])
            for name in ("../x", "a/b", "a%2Fb", "c\\d")}
    written = write_voc_results(out, "test", dets)
    assert {p.parent for p in written} == {out} and len(set(written)) == 4
    assert sorted(p.name for p in tmp_path.rglob("*.txt")) == sorted(p.name for p in written)
    back, missing = read_voc_results(out, "test", list(dets))
    assert not missing and all(back[name].image_ids == ["i"] for name in dets)
    assert result_file_name("test", "diningtable") == "comp4_det_test_diningtable.txt"


def test_an_image_id_with_spaces_round_trips(tmp_path):
    """Ids are file stems, which may hold spaces: the last five fields are the numbers."""
    dets = {"cat": ClassDetections(["my photo 1", "b"], [0.5, 0.25],
                                   [[0, 0, 9, 19], [1, 1, 5, 5]])}
    write_voc_results(tmp_path, "test", dets)
    back = read_result_file(tmp_path / "comp4_det_test_cat.txt")
    assert back.image_ids == ["my photo 1", "b"]
    np.testing.assert_allclose(back.boxes, dets["cat"].boxes)


@pytest.mark.parametrize("line, reason", [("a 0.5 1 2 3", "got 5 fields"),
                                          ("a x 1 2 3 4", "must be numbers"),
                                          ("a nan 1 2 3 4", "finite")])
def test_malformed_line_names_file_and_line(tmp_path, line, reason):
    path = tmp_path / "comp4_det_test_cat.txt"
    path.write_text(f"ok 0.1 1 1 2 2\n{line}\n")
    with pytest.raises(ResultFileError) as err:
        read_result_file(path)
    assert str(path) in str(err.value) and "line 2" in str(err.value) and reason in str(err.value)


def test_detections_by_class_from_per_image_outputs():
    per_image = {"a": {"boxes": np.array([[0, 0, 1, 1], [2, 2, 3, 3]]), "labels": np.array([1, 2]),
                       "scores": np.array([0.9, 0.8])},
                 "b": {"boxes": np.zeros((0, 4)), "labels": np.zeros(0, int), "scores": np.zeros(0)},
                 "c": {"boxes": np.array([[4, 4, 5, 5]]), "labels": np.array([2]),
                       "scores": np.array([0.1])}}
    out = detections_by_class(per_image, ["cat", "dog"])
    assert out["cat"].image_ids == ["a"]
    assert out["dog"].image_ids == ["a", "c"]
    np.testing.assert_allclose(out["dog"].boxes, [[2, 2, 3, 3], [4, 4, 5, 5]])
