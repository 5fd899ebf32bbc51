"""The Visual Decathlon (Rebuffi, Bilen and Vedaldi, 2017): its ten domains, the
challenge's score, and the results file its evaluation server takes.

Domains are named as the configs of the TFDS dataset `visual_domain_decathlon`
(task spec ``tfds:visual_domain_decathlon/<domain>``).  Accuracies are
fractions in [0, 1], as everywhere in this project (report.json).

Score (the paper's results; the challenge's scoring rule): for each domain d with
test error E_d and Emax_d = twice the error of the challenge's fine-tuned
ResNet-26 baseline,

    S = sum_d 1000 * (max(0, Emax_d - E_d) / Emax_d) ** 2

so a perfect domain scores 1000, the baseline's accuracy 250 (the baseline
scores 2500 in all) and anything at or below twice its error 0.

Nothing here imports TensorFlow.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import numbers
import os
from typing import Iterable, Mapping, Sequence

from nettailor_tf.common import atomic

__all__ = [
    "DOMAINS",
    "NUM_CLASSES",
    "BASELINE_ACCURACY",
    "CATEGORY_ID_BASE",
    "Annotations",
    "max_error",
    "domain_scores",
    "decathlon_score",
    "category_id",
    "load_annotations",
    "submission_json",
    "read_submission",
    "submission_text",
    "task_domain",
    "stripped_test_annotations",
    "write_task_predictions",
    "read_task_predictions",
    "merge_task_predictions",
]

# The TFDS config names, in the challenge's (alphabetical) order: this order is
# also the one the challenge's category ids follow (CATEGORY_ID_BASE).
DOMAINS: tuple[str, ...] = ("aircraft", "cifar100", "daimlerpedcls", "dtd", "gtsrb",
                            "imagenet12", "omniglot", "svhn", "ucf101", "vgg-flowers")

NUM_CLASSES: dict[str, int] = {
    "aircraft": 100, "cifar100": 100, "daimlerpedcls": 2, "dtd": 47, "gtsrb": 43,
    "imagenet12": 1000, "omniglot": 1623, "svhn": 10, "ucf101": 101, "vgg-flowers": 102,
}

# Test accuracy of the challenge's fine-tuned ResNet-26 baseline (the NetTailor paper's
# Table 3: ImNet 59.87, Airc 60.34, C100 82.12, DPed 92.82, DTD 55.53,
# GTSR 97.53, Flwr 81.41, Oglt 87.69, SVHN 96.55, UCF 51.20), as fractions.
BASELINE_ACCURACY: dict[str, float] = {
    "aircraft": 0.6034, "cifar100": 0.8212, "daimlerpedcls": 0.9282, "dtd": 0.5553,
    "gtsrb": 0.9753, "imagenet12": 0.5987, "omniglot": 0.8769, "svhn": 0.9655,
    "ucf101": 0.5120, "vgg-flowers": 0.8141,
}

MAX_DOMAIN_SCORE = 1000.0

# Category ids of the challenge's annotation files (decathlon-1.0 devkit,
# annotations/<domain>_{train,val,test_stripped}.json, COCO style): the k-th
# class (0-based) of the d-th domain of DOMAINS has id 10_000_000 * (d + 1) +
# k + 1, e.g. 10000001 is aircraft's first class, 100000102 vgg-flowers' last.
# Confirmed from three independent public codes that produced submissions:
# - pedro-morgado/nettailor, decathlon_dataloaders.py: CATEGORY_ID_BASE (the
#   same bases as here), labels = category_id - base - 1, and
#   main_student_decathlon.py writes [{"image_id", "category_id"}] records;
# - gyhui14/spottune, submit/submit_test.py: category_id =
#   int(10e6 * (task_id + 1) + prediction + 1), task_id in this order, and the
#   image ids read from <domain>_test_stripped.json;
# - srebuffi/residual_adapters (the challenge organisers' code),
#   imdbfolder_coco.py: labels = category_id - 1 - min(category_id), i.e. the
#   ids of a domain are contiguous.
# TFDS builds its labels as the position of each category in the annotation
# file's "categories" list (tensorflow_datasets/image_classification/
# visual_domain_decathlon.py), so label k <-> categories[k]["id"]; pass
# `category_ids` from `load_annotations` to use that list itself.
CATEGORY_ID_BASE: dict[str, int] = {d: 10_000_000 * (i + 1) for i, d in enumerate(DOMAINS)}

_ACCEPTED = ", ".join(DOMAINS)


# --------------------------------------------------------------------------- #
# Score
# --------------------------------------------------------------------------- #


def _unknown_domain(domain: object, where: str) -> ValueError:
    close = difflib.get_close_matches(str(domain), DOMAINS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ValueError(f"{where}: unknown domain {domain!r}{hint}; accepted: {_ACCEPTED}")


def _check_domain(domain: object, where: str) -> str:
    if not isinstance(domain, str) or domain not in NUM_CLASSES:
        raise _unknown_domain(domain, where)
    return domain


def max_error(domain: str) -> float:
    """Emax_d: twice the baseline's test error on `domain`."""
    return 2.0 * (1.0 - BASELINE_ACCURACY[_check_domain(domain, "max_error")])


def _checked_accuracies(accuracies: Mapping[str, float], where: str) -> dict[str, float]:
    if not isinstance(accuracies, Mapping):
        raise ValueError(f"{where}: expected a dict {{domain: accuracy in [0, 1]}} for the ten "
                         f"domains {_ACCEPTED}; got {type(accuracies).__name__}")
    for domain in accuracies:
        _check_domain(domain, where)
    missing = [d for d in DOMAINS if d not in accuracies]
    if missing:
        raise ValueError(f"{where}: missing domain(s) {', '.join(missing)}; the score needs an "
                         f"accuracy for each of the ten domains: {_ACCEPTED}")
    checked = {}
    for domain in DOMAINS:
        value = accuracies[domain]
        if (isinstance(value, bool) or not isinstance(value, numbers.Real)
                or not math.isfinite(float(value)) or not 0.0 <= float(value) <= 1.0):
            hint = " (a percentage? divide by 100)" if (
                isinstance(value, numbers.Real) and not isinstance(value, bool)
                and math.isfinite(float(value)) and 1.0 < float(value) <= 100.0) else ""
            raise ValueError(f"{where}: accuracy of {domain!r} is {value!r}{hint}; accepted: a "
                             f"fraction in [0, 1]")
        checked[domain] = float(value)
    return checked


def _domain_score(domain: str, accuracy: float) -> float:
    emax = max_error(domain)
    error = 1.0 - accuracy
    return MAX_DOMAIN_SCORE * (max(0.0, emax - error) / emax) ** 2


def domain_scores(accuracies: Mapping[str, float]) -> dict[str, float]:
    """Each domain's share of the score (0 to 1000), for exactly the ten domains.

    Raises ValueError (one line, naming the domain and what is accepted) for a
    missing or unknown domain or an accuracy outside [0, 1].
    """
    checked = _checked_accuracies(accuracies, "decathlon score")
    return {d: _domain_score(d, checked[d]) for d in DOMAINS}


def decathlon_score(accuracies: Mapping[str, float]) -> float:
    """The Visual Decathlon score S (0 to 10000) of {domain: test accuracy in [0, 1]}.

    `accuracies` must name exactly the ten domains of `DOMAINS`.  The paper's
    Table 3 rounds S to an integer (NetTailor 3744, Residual adapters 3412,
    Piggyback 2838; the baseline 2500).
    """
    return sum(domain_scores(accuracies).values())


# --------------------------------------------------------------------------- #
# Submission file
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class Annotations:
    """What a submission needs from one of the devkit's annotation files.

    image_ids: image id by file name, with the devkit's leading ``data/``
      removed, which is exactly the ``name`` feature of the TFDS examples
      (e.g. ``"aircraft/test/0000001.jpg"``).
    category_ids: category ids in the file's order; TFDS label k is
      ``category_ids[k]``.
    """

    image_ids: dict[str, int]
    category_ids: tuple[int, ...]


def _read_json(path, what: str):
    """A JSON file's content, or a one-line ValueError naming `what` and `path`."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as err:
        raise ValueError(f"{what} {path}: {err.strerror}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{what} {path}: not JSON ({err.msg}, line {err.lineno})") from None


def load_annotations(path: str) -> Annotations:
    """Reads a devkit annotation file (``<domain>_test_stripped.json`` for a
    submission; ``_train``/``_val`` have the same "images" and "categories")."""
    data = _read_json(path, "annotation file")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("categories"), list):
        raise ValueError(f"annotation file {path}: expected a COCO-style object with 'images' "
                         f"and 'categories' lists (decathlon-1.0/annotations/*.json)")
    prefix = "data/"
    image_ids = {}
    try:
        for image in data["images"]:
            name = image["file_name"]
            image_ids[name[len(prefix):] if name.startswith(prefix) else name] = int(image["id"])
        category_ids = tuple(int(c["id"]) for c in data["categories"])
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise ValueError(f"annotation file {path}: an image or category entry lacks an integer "
                         f"'id' or a 'file_name' ({type(err).__name__}: {err})") from None
    return Annotations(image_ids=image_ids, category_ids=category_ids)


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _category_table(domain: str, category_ids: Mapping[str, Sequence[int]] | None) -> list[int]:
    if category_ids is not None and domain in category_ids:
        table = [int(c) for c in category_ids[domain]]
        if len(table) != NUM_CLASSES[domain] or len(set(table)) != len(table):
            raise ValueError(f"category ids of {domain!r}: expected {NUM_CLASSES[domain]} distinct "
                             f"ids (the annotation file's 'categories'), got {len(table)}")
        return table
    base = CATEGORY_ID_BASE[domain]
    return list(range(base + 1, base + NUM_CLASSES[domain] + 1))


def category_id(domain: str, label: int,
                category_ids: Mapping[str, Sequence[int]] | None = None) -> int:
    """The challenge's category id of 0-based class `label` of `domain`."""
    table = _category_table(_check_domain(domain, "category_id"), category_ids)
    if not _is_int(label) or not 0 <= label < len(table):
        raise ValueError(f"category_id: label {label!r} of {domain!r}; accepted: an integer in "
                         f"[0, {len(table)})")
    return table[int(label)]


def _records(predictions: Mapping[str, Mapping[int, int]],
             category_ids: Mapping[str, Sequence[int]] | None,
             require_all_domains: bool) -> list[dict[str, int]]:
    if not isinstance(predictions, Mapping) or not predictions:
        raise ValueError("submission: expected a non-empty dict {domain: {image_id: label}}; "
                         f"domains: {_ACCEPTED}")
    for domain in predictions:
        _check_domain(domain, "submission")
    if require_all_domains:
        missing = [d for d in DOMAINS if d not in predictions]
        if missing:
            raise ValueError(f"submission: no predictions for {', '.join(missing)}; the challenge "
                             f"scores all ten domains: {_ACCEPTED}")
    records, seen = [], {}
    for domain in DOMAINS:
        if domain not in predictions:
            continue
        by_image = predictions[domain]
        if not isinstance(by_image, Mapping) or not by_image:
            raise ValueError(f"submission: predictions of {domain!r} must be a non-empty dict "
                             f"{{image_id: label}}")
        table = _category_table(domain, category_ids)
        for image_id in by_image:
            if not _is_int(image_id) or image_id < 0:
                raise ValueError(f"submission: image id {image_id!r} of {domain!r}; accepted: a "
                                 f"non-negative integer from the annotation file")
        for image_id in sorted(by_image, key=int):
            label = by_image[image_id]
            if int(image_id) in seen:
                raise ValueError(f"submission: image id {image_id} appears in both "
                                 f"{seen[int(image_id)]!r} and {domain!r}; the challenge's image "
                                 f"ids are unique across domains")
            if not _is_int(label) or not 0 <= label < len(table):
                raise ValueError(f"submission: label {label!r} for image {image_id} of {domain!r}; "
                                 f"accepted: an integer in [0, {len(table)})")
            seen[int(image_id)] = domain
            records.append({"image_id": int(image_id), "category_id": table[int(label)]})
    return records


def submission_json(predictions: Mapping[str, Mapping[int, int]], path: str | None = None, *,
                    category_ids: Mapping[str, Sequence[int]] | None = None,
                    require_all_domains: bool = False) -> list[dict[str, int]]:
    """The Visual Decathlon results file for test predictions.

    Args:
      predictions: {domain: {image_id: predicted label}}.  Image ids are those
        of the devkit's ``<domain>_test_stripped.json`` (`load_annotations`
        maps a TFDS example's ``name`` to its id); labels are 0-based class
        indices in the TFDS / model order.
      path: where to write the JSON (atomically);
        None writes nothing.
      category_ids: optional {domain: category ids in label order}, e.g.
        ``load_annotations(...).category_ids``; other domains use
        `CATEGORY_ID_BASE` (the two agree for the devkit's files).
      require_all_domains: raise unless all ten domains are present.

    Returns:
      The records, ``[{"image_id": int, "category_id": int}, ...]`` ordered
      by domain (DOMAINS order) then image id.

    Format, and what was confirmed.  The challenge page
    (robots.ox.ac.uk/~vgg/decathlon) asks for a ``results.json`` "for the
    images in the test set", packed in a ZIP and uploaded to the VGG Codalab
    server; the devkit's annotations are COCO style.  The record shape (a JSON
    list of {"image_id", "category_id"}, the ids taken from the annotation
    files, category ids offset per domain as in `CATEGORY_ID_BASE`) is
    confirmed by public code that produced submissions: pedro-morgado/nettailor
    (main_student_decathlon.py, decathlon_dataloaders.py) and
    gyhui14/spottune (submit/submit_test.py); see the comment above
    `CATEGORY_ID_BASE`.  Not confirmed (the page's detailed text was not
    available): whether the server rejects a file that lacks some domains or
    test images (likely: each missing image counts as an error), and whether
    extra keys such as "score" are tolerated (none are written).  NetTailor's
    own script writes image ids as strings; the others, and COCO, write
    integers, as here.
    """
    records = _records(predictions, category_ids, require_all_domains)
    if path is not None:
        atomic.write_text(path, submission_text(records))
    return records


def submission_text(records: list[dict[str, int]]) -> str:
    """The results file's content for `submission_json`'s records."""
    return json.dumps(records, separators=(",", ":"))


def read_submission(source: str | Iterable[Mapping[str, int]],
                    category_ids: Mapping[str, Sequence[int]] | None = None
                    ) -> dict[str, dict[int, int]]:
    """The inverse of `submission_json`: a results file (path) or its records
    back to {domain: {image_id: label}}."""
    if isinstance(source, (str, os.PathLike)):
        records = _read_json(source, "submission file")
    else:
        records = list(source)
    if not isinstance(records, list):
        raise ValueError("submission: expected a JSON list of {\"image_id\": int, "
                         "\"category_id\": int} records")
    lookup = {}
    for domain in DOMAINS:
        for label, cat in enumerate(_category_table(domain, category_ids)):
            lookup[cat] = (domain, label)
    out: dict[str, dict[int, int]] = {}
    for record in records:
        if (not isinstance(record, Mapping) or set(record) != {"image_id", "category_id"}
                or not _is_int(record["image_id"]) or not _is_int(record["category_id"])):
            raise ValueError(f"submission: bad record {record!r}; accepted: "
                             "{\"image_id\": int, \"category_id\": int}")
        if record["category_id"] not in lookup:
            raise ValueError(f"submission: category id {record['category_id']} belongs to no "
                             f"domain's categories (ids are 10000000 * (domain index + 1) + "
                             f"class + 1, domains in the order {_ACCEPTED})")
        domain, label = lookup[record["category_id"]]
        image_id = int(record["image_id"])
        if image_id in out.get(domain, {}):
            raise ValueError(f"submission: image id {image_id} of {domain!r} appears twice")
        out.setdefault(domain, {})[image_id] = label
    return out


# --------------------------------------------------------------------------- #
# Per-task prediction files and their merge into one results file
# --------------------------------------------------------------------------- #

_TASK_PREFIX = "tfds:visual_domain_decathlon/"


def task_domain(spec: str) -> str | None:
    """The domain of a task spec ``tfds:visual_domain_decathlon/<domain>[:version]``,
    or None for any other task."""
    if not isinstance(spec, str) or not spec.startswith(_TASK_PREFIX):
        return None
    domain = spec[len(_TASK_PREFIX):].split(":", 1)[0]
    return domain if domain in NUM_CLASSES else None


def stripped_test_annotations(annotations_dir: str, domain: str) -> str:
    """Where the devkit keeps a domain's test images and their ids."""
    return os.path.join(annotations_dir, f"{_check_domain(domain, 'annotations')}"
                                         f"_test_stripped.json")


# Bumped when the layout of a per-task predictions file changes.
_PREDICTIONS_FORMAT = 1


def write_task_predictions(path: str, domain: str, predictions: Mapping[int, int],
                           category_ids: Sequence[int], fingerprint: str = "") -> None:
    """Writes one task's test predictions ({image id: label}) atomically.

    The file carries the domain and its category ids, so that several runs'
    files (one workdir per domain) merge without the annotation files."""
    _records({domain: predictions}, {domain: category_ids}, require_all_domains=False)
    content = {"format": _PREDICTIONS_FORMAT, "domain": domain, "fingerprint": fingerprint,
               "category_ids": [int(c) for c in category_ids],
               "predictions": {str(int(i)): int(label) for i, label in sorted(predictions.items())}}
    atomic.write_text(path, json.dumps(content, separators=(",", ":")) + "\n")


@dataclasses.dataclass(frozen=True)
class TaskPredictions:
    domain: str
    predictions: dict[int, int]
    category_ids: tuple[int, ...]
    fingerprint: str


def read_task_predictions(path: str) -> TaskPredictions:
    """Reads a file of `write_task_predictions`; one-line ValueError if it is not one."""
    data = _read_json(path, "predictions file")
    if (not isinstance(data, dict) or data.get("format") != _PREDICTIONS_FORMAT
            or not isinstance(data.get("predictions"), dict)
            or not isinstance(data.get("category_ids"), list)):
        raise ValueError(f"predictions file {path}: not a predictions file of this version "
                         f"(written by the submission stage as "
                         f"<workdir>/<task>/decathlon_test_predictions.json)")
    domain = _check_domain(data.get("domain"), f"predictions file {path}")
    try:
        predictions = {int(i): int(label) for i, label in data["predictions"].items()}
        category_ids = tuple(int(c) for c in data["category_ids"])
    except (TypeError, ValueError):
        raise ValueError(f"predictions file {path}: image ids, labels and category ids must "
                         f"be integers") from None
    return TaskPredictions(domain, predictions, category_ids, str(data.get("fingerprint", "")))


def merge_task_predictions(paths: Sequence[str], output: str | None = None, *,
                           require_all_domains: bool = False) -> list[dict[str, int]]:
    """One results file (`submission_json`) from per-task prediction files.

    Raises ValueError (one line) when two files hold the same domain, or, with
    `require_all_domains`, when a domain is missing."""
    if not paths:
        raise ValueError("no predictions files given; the submission stage writes "
                         "<workdir>/<task>/decathlon_test_predictions.json")
    predictions, category_ids, sources = {}, {}, {}
    for path in paths:
        task = read_task_predictions(path)
        if task.domain in sources:
            raise ValueError(f"predictions files {sources[task.domain]} and {path} both hold "
                             f"{task.domain!r}; pass one file per domain")
        sources[task.domain] = path
        predictions[task.domain] = task.predictions
        category_ids[task.domain] = task.category_ids
    return submission_json(predictions, output, category_ids=category_ids,
                           require_all_domains=require_all_domains)
