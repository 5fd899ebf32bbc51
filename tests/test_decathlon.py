"""Visual Decathlon score and results file (nettailor_tf.decathlon); no TensorFlow."""
import json
import os

import pytest

from nettailor_tf import decathlon
from nettailor_tf.decathlon import (BASELINE_ACCURACY, DOMAINS, NUM_CLASSES, decathlon_score,
                                    domain_scores, read_submission, submission_json)

# The paper's Table 3 (the paper's results), columns in the paper's order.
TABLE3_ORDER = ("imagenet12", "aircraft", "cifar100", "daimlerpedcls", "dtd", "gtsrb",
                "vgg-flowers", "omniglot", "svhn", "ucf101")
TABLE3 = {
    "NetTailor": ("61.42 75.07 81.84 94.68 61.28 99.52 86.53 90.09 96.44 49.54", 3744),
    "Residual adapters": ("60.32 64.21 81.91 94.73 58.83 99.38 84.68 89.21 96.54 50.94", 3412),
    "Piggyback": ("57.69 65.29 79.87 96.99 57.45 97.27 79.09 87.63 97.24 47.48", 2838),
}


def percents(row: str, shift: float = 0.0) -> dict:
    return {d: (float(a) + shift) / 100 for d, a in zip(TABLE3_ORDER, row.split())}


def test_domains_are_the_tfds_configs_with_the_papers_class_counts():
    assert DOMAINS == ("aircraft", "cifar100", "daimlerpedcls", "dtd", "gtsrb", "imagenet12",
                       "omniglot", "svhn", "ucf101", "vgg-flowers")
    assert set(NUM_CLASSES) == set(BASELINE_ACCURACY) == set(DOMAINS)
    assert NUM_CLASSES["omniglot"] == 1623 and NUM_CLASSES["daimlerpedcls"] == 2
    assert BASELINE_ACCURACY["imagenet12"] == pytest.approx(0.5987)
    assert BASELINE_ACCURACY["ucf101"] == pytest.approx(0.5120)


@pytest.mark.parametrize("method", sorted(TABLE3))
def test_score_reproduces_table3(method):
    # The table's accuracies are rounded to 2 decimals (+-0.005 points each)
    # and its scores to integers (+-0.5).  S increases with every accuracy, so
    # the exact accuracies' score lies between the scores of the rows shifted
    # by -0.005 and +0.005 points: about +-3.8 points here (gtsrb, with a
    # baseline error of 2.47%, alone moves about 1 point).  The published score
    # must fall in that interval widened by the rounding of S itself; and the
    # score of the rounded row must be within a few points of it.
    row, published = TABLE3[method]
    low = decathlon_score(percents(row, -0.005))
    high = decathlon_score(percents(row, +0.005))
    assert low - 0.5 <= published <= high + 0.5
    assert high - low < 8
    assert decathlon_score(percents(row)) == pytest.approx(published, abs=4)


def test_baseline_scores_2500_and_perfect_10000():
    assert decathlon_score(BASELINE_ACCURACY) == pytest.approx(2500)
    assert all(s == pytest.approx(250) for s in domain_scores(BASELINE_ACCURACY).values())
    assert decathlon_score({d: 1.0 for d in DOMAINS}) == pytest.approx(10000)
    # At or below twice the baseline's error a domain scores 0, not negative.
    worst = {d: 0.0 for d in DOMAINS}
    assert decathlon_score(worst) == 0
    at_emax = {d: 1 - decathlon.max_error(d) for d in DOMAINS if decathlon.max_error(d) <= 1}
    assert all(domain_scores({**worst, **at_emax})[d] == pytest.approx(0, abs=1e-9)
               for d in at_emax)


def test_domain_scores_sum_to_the_score():
    acc = percents(TABLE3["NetTailor"][0])
    scores = domain_scores(acc)
    assert list(scores) == list(DOMAINS)
    assert sum(scores.values()) == pytest.approx(decathlon_score(acc))
    # gtsrb: error 0.48% against Emax = 2 * 2.47% = 4.94%.
    assert scores["gtsrb"] == pytest.approx(1000 * ((0.0494 - 0.0048) / 0.0494) ** 2)


@pytest.mark.parametrize("change,message", [
    (lambda a: a.pop("dtd"), "missing domain(s) dtd"),
    (lambda a: a.update(flowers=0.9), "unknown domain 'flowers'"),
    (lambda a: a.update(svhn=96.5), "accuracy of 'svhn' is 96.5 (a percentage? divide by 100)"),
    (lambda a: a.update(svhn=-0.1), "accuracy of 'svhn' is -0.1"),
    (lambda a: a.update(svhn=float("nan")), "accuracy of 'svhn' is nan"),
    (lambda a: a.update(svhn="0.9"), "accuracy of 'svhn' is '0.9'"),
    (lambda a: a.update(svhn=True), "accuracy of 'svhn' is True"),
])
def test_bad_accuracies_raise_one_line(change, message):
    acc = dict(BASELINE_ACCURACY)
    change(acc)
    with pytest.raises(ValueError) as err:
        decathlon_score(acc)
    text = str(err.value)
    assert message in text and "\n" not in text
    assert "aircraft" in text or "[0, 1]" in text  # says what is accepted


def test_unknown_domain_suggests_the_tfds_name():
    acc = {**BASELINE_ACCURACY, "vgg_flowers": 0.8}
    with pytest.raises(ValueError, match="did you mean 'vgg-flowers'"):
        decathlon_score(acc)
    with pytest.raises(ValueError, match="expected a dict"):
        decathlon_score([0.5] * 10)


def test_category_ids_follow_the_devkit_offsets():
    assert decathlon.category_id("aircraft", 0) == 10000001
    assert decathlon.category_id("imagenet12", 999) == 60001000
    assert decathlon.category_id("vgg-flowers", 101) == 100000102
    with pytest.raises(ValueError, match=r"label 2 of 'daimlerpedcls'.*\[0, 2\)"):
        decathlon.category_id("daimlerpedcls", 2)


def test_submission_round_trips_through_the_file(tmp_path):
    predictions = {"svhn": {80000003: 9, 80000001: 0}, "aircraft": {10000002: 99},
                   "vgg-flowers": {100000001: 5}}
    path = tmp_path / "sub" / "results.json"
    records = submission_json(predictions, str(path))
    # Domain order, then image id; plain ints; nothing else in a record.
    assert records == [{"image_id": 10000002, "category_id": 10000100},
                       {"image_id": 80000001, "category_id": 80000001},
                       {"image_id": 80000003, "category_id": 80000010},
                       {"image_id": 100000001, "category_id": 100000006}]
    assert json.loads(path.read_text()) == records
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]  # no temporary left
    assert read_submission(str(path)) == predictions
    assert read_submission(records) == predictions


def test_submission_uses_the_annotation_files_ids(tmp_path):
    # A miniature test_stripped.json: the devkit's layout, "data/" prefixed names.
    annotation = {
        "images": [{"id": 7001, "file_name": "data/dtd/test/a.jpg", "width": 72, "height": 72},
                   {"id": 7002, "file_name": "data/dtd/test/b.jpg", "width": 72, "height": 72}],
        "categories": [{"id": 40000001 + k, "name": f"c{k}"} for k in range(47)][::-1],
        "annotations": [],
    }
    path = tmp_path / "dtd_test_stripped.json"
    path.write_text(json.dumps(annotation))
    ann = decathlon.load_annotations(str(path))
    assert ann.image_ids == {"dtd/test/a.jpg": 7001, "dtd/test/b.jpg": 7002}
    # TFDS's label k is the k-th entry of "categories" (here in reverse order).
    preds = {"dtd": {ann.image_ids["dtd/test/a.jpg"]: 0, ann.image_ids["dtd/test/b.jpg"]: 46}}
    records = submission_json(preds, category_ids={"dtd": ann.category_ids})
    assert records == [{"image_id": 7001, "category_id": 40000047},
                       {"image_id": 7002, "category_id": 40000001}]
    assert read_submission(records, category_ids={"dtd": ann.category_ids}) == preds


@pytest.mark.parametrize("predictions,kwargs,message", [
    ({}, {}, "non-empty dict"),
    ({"flowers": {1: 0}}, {}, "unknown domain 'flowers'"),
    ({"svhn": {1: 10}}, {}, r"label 10 for image 1 of 'svhn'; accepted: an integer in \[0, 10\)"),
    ({"svhn": {1: 1.0}}, {}, "label 1.0"),
    ({"svhn": {"a.jpg": 1}}, {}, "image id 'a.jpg'"),
    ({"svhn": {1: 1}, "dtd": {1: 1}}, {}, "image id 1 appears in both 'dtd' and 'svhn'"),
    ({"svhn": {1: 1}}, {"require_all_domains": True}, "no predictions for aircraft"),
    ({"dtd": {1: 1}}, {"category_ids": {"dtd": [1, 2]}}, "expected 47 distinct ids"),
])
def test_bad_submissions_raise_and_write_nothing(tmp_path, predictions, kwargs, message):
    path = tmp_path / "results.json"
    with pytest.raises(ValueError, match=message):
        submission_json(predictions, str(path), **kwargs)
    assert not os.listdir(tmp_path)


def test_bad_results_files_raise(tmp_path):
    with pytest.raises(ValueError, match="belongs to no domain"):
        read_submission([{"image_id": 1, "category_id": 5}])
    with pytest.raises(ValueError, match="bad record"):
        read_submission([{"image_id": 1, "category_id": 10000001, "score": 0.9}])
    with pytest.raises(ValueError, match="appears twice"):
        read_submission([{"image_id": 1, "category_id": 10000001}] * 2)
    bad = tmp_path / "r.json"
    bad.write_text("{")
    with pytest.raises(ValueError, match="not JSON"):
        read_submission(str(bad))


def test_bad_annotation_files_raise(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps({"images": [{"id": 1}], "categories": []}))
    with pytest.raises(ValueError, match="lacks an integer 'id' or a 'file_name'"):
        decathlon.load_annotations(str(path))
    path.write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="COCO-style object"):
        decathlon.load_annotations(str(path))
    with pytest.raises(ValueError, match="annotation file .*missing.json"):
        decathlon.load_annotations(str(tmp_path / "missing.json"))


def test_task_domain_reads_decathlon_specs_only():
    assert decathlon.task_domain("tfds:visual_domain_decathlon/vgg-flowers") == "vgg-flowers"
    assert decathlon.task_domain("tfds:visual_domain_decathlon/dtd:1.2.0") == "dtd"
    for spec in ("tfds:visual_domain_decathlon/flowers", "tfds:svhn_cropped", "mnist5k",
                 "folder:/data/visual_domain_decathlon/dtd"):
        assert decathlon.task_domain(spec) is None, spec


def test_task_prediction_files_merge_into_one_results_file(tmp_path):
    dtd_ids = [3_999_000 + k for k in range(47)]  # as if the devkit had other ids
    decathlon.write_task_predictions(str(tmp_path / "a.json"), "dtd", {41: 46, 40: 0}, dtd_ids,
                                     fingerprint="abc")
    decathlon.write_task_predictions(str(tmp_path / "b.json"), "svhn", {7: 3},
                                     [80_000_001 + k for k in range(10)])
    task = decathlon.read_task_predictions(str(tmp_path / "a.json"))
    assert (task.domain, task.predictions, task.fingerprint) == ("dtd", {40: 0, 41: 46}, "abc")
    out = str(tmp_path / "results.json")
    records = decathlon.merge_task_predictions([str(tmp_path / "a.json"),
                                                str(tmp_path / "b.json")], out)
    assert records == [{"image_id": 40, "category_id": 3_999_000},
                       {"image_id": 41, "category_id": 3_999_046},
                       {"image_id": 7, "category_id": 80_000_004}]
    assert json.loads(open(out).read()) == records
    with pytest.raises(ValueError, match="no predictions for aircraft, cifar100"):
        decathlon.merge_task_predictions([str(tmp_path / "b.json")], require_all_domains=True)
    with pytest.raises(ValueError, match="both hold 'svhn'"):
        decathlon.merge_task_predictions([str(tmp_path / "b.json")] * 2)
    (tmp_path / "c.json").write_text('[{"image_id": 1, "category_id": 2}]')
    with pytest.raises(ValueError, match="c.json: not a predictions file"):
        decathlon.read_task_predictions(str(tmp_path / "c.json"))
    with pytest.raises(ValueError, match="label 10 for image 7 of 'svhn'"):
        decathlon.write_task_predictions(str(tmp_path / "d.json"), "svhn", {7: 10},
                                         [80_000_001 + k for k in range(10)])
    assert not (tmp_path / "d.json").exists()
