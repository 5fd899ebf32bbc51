"""The submission stage on a mocked Visual Decathlon domain: tiny backbone,
one short epoch per stage.  The mocked test split holds the validation
images again under other names, in another order, so the predictions the
stage writes can be scored and compared with the accuracy the finetune
stage reported on the validation split."""
import dataclasses
import io
import json

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from nettailor_tf import decathlon, stages
from nettailor_tf.settings.config import Config
from nettailor_tf.training.train import Schedule

ONE_EPOCH = Schedule(epochs=1, batch_size=16, learning_rate=0.05, decay_epochs=1)
# Long enough for the pruned network to tell colours apart: predictions of
# one class only would not show that they reach the right image ids.
LEARN = Schedule(epochs=8, batch_size=16, learning_rate=0.1, decay_epochs=8)
SPEC = "tfds:visual_domain_decathlon/svhn"
NAME = "visual_domain_decathlon/svhn"  # the report's key
TASK_DIR = "tasks/visual_domain_decathlon_svhn"
NUM_TRAIN, NUM_VALIDATION = 48, 24


def _png(array):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _images(rng, labels):
    # Class-dependent colour plus noise, sizes around the model's 16 px.
    out = []
    for label in labels:
        size = int(rng.integers(14, 22))
        base = np.array([25 * label, 255 - 25 * label, 128], np.float64)
        pixels = base + rng.normal(0, 30, (size, size, 3))
        out.append(_png(np.clip(pixels, 0, 255).astype(np.uint8)))
    return out


class FakeDecathlon:
    """train / validation / test of one domain, the test split unlabelled."""

    def __init__(self):
        rng = np.random.default_rng(0)
        # Three well-separated colours of the ten classes: easy to learn.
        self.train_labels = rng.choice([0, 4, 9], NUM_TRAIN)
        self.train = _images(rng, self.train_labels)
        self.validation_labels = rng.choice([0, 4, 9], NUM_VALIDATION)
        self.validation = _images(rng, self.validation_labels)
        # The test split: validation image k stored at position order[k].
        self.order = rng.permutation(NUM_VALIDATION)
        self.test_names = [f"svhn/test/{7000 + i:07d}.png" for i in range(NUM_VALIDATION)]
        self.test = [None] * NUM_VALIDATION
        for k, position in enumerate(self.order):
            self.test[position] = self.validation[k]
        # Image ids as the devkit gives them: unique, unrelated to the order.
        self.image_ids = {name: int(i) for name, i in zip(
            self.test_names, rng.choice(np.arange(70_000_000, 70_100_000), NUM_VALIDATION,
                                        replace=False))}

    def split(self, split):
        split = str(split)
        if split == "train":
            images, labels = self.train, self.train_labels
            names = [f"svhn/train/{i:07d}.png" for i in range(NUM_TRAIN)]
        elif split == "validation":
            images, labels = self.validation, self.validation_labels
            names = [f"svhn/val/{i:07d}.png" for i in range(NUM_VALIDATION)]
        else:
            images, labels, names = self.test, np.full(NUM_VALIDATION, -1), self.test_names
        return tf.data.Dataset.from_tensor_slices(
            {"image": images, "label": np.asarray(labels, np.int64), "name": names})

    def write_annotations(self, folder, drop=0):
        images = [{"id": self.image_ids[n], "file_name": f"data/{n}", "width": 16, "height": 16}
                  for n in reversed(self.test_names[drop:])]
        base = decathlon.CATEGORY_ID_BASE["svhn"]
        categories = [{"id": base + k + 1, "name": str(k)} for k in range(10)]
        folder.mkdir(exist_ok=True)
        (folder / "svhn_test_stripped.json").write_text(json.dumps(
            {"images": images, "categories": categories, "annotations": []}))
        return str(folder)


@pytest.fixture(scope="module")
def fake():
    data = FakeDecathlon()

    def as_dataset(builder, split, decoders=None, read_config=None, **kwargs):
        return data.split(split)

    with tfds.testing.mock_data(as_dataset_fn=as_dataset,
                                policy=tfds.testing.MockPolicy.USE_CODE):
        yield data


def _config(workdir, annotations, **overrides):
    values = dict(workdir=str(workdir), tasks=(SPEC,),
                  stages=("teacher", "student", "prune", "finetune", "submission"),
                  backbone="tiny", backbone_weights="random", image_size=16, teacher=ONE_EPOCH,
                  student=ONE_EPOCH, finetune=LEARN, prune_universal=1,
                  prune_proxy_threshold=0.0, log_every=1, checkpoint_every=3,
                  gate_lr_multiplier=1.0, selection_split="test",
                  eval_batch_size=10, decathlon_annotations=annotations)
    values.update(overrides)
    config = Config(**values)
    config.validate()
    return config


@pytest.fixture(scope="module")
def submitted(fake, tmp_path_factory):
    root = tmp_path_factory.mktemp("submission")
    config = _config(root / "run", fake.write_annotations(root / "annotations"))
    stages.run(config, tf.distribute.get_strategy())
    return config


def test_predictions_score_what_the_finetune_stage_reported(fake, submitted):
    workdir = submitted.workdir
    report = json.loads(open(f"{workdir}/report.json").read())
    results = decathlon.read_submission(f"{workdir}/decathlon_results.json")
    assert list(results) == ["svhn"]
    by_id = results["svhn"]
    assert sorted(by_id) == sorted(fake.image_ids.values())
    # Validation image k is test image order[k]: score the test predictions.
    predicted = np.array([by_id[fake.image_ids[fake.test_names[p]]] for p in fake.order])
    correct = int(np.sum(predicted == fake.validation_labels))
    reported = report["tasks"][NAME]["pruned"]["accuracy"] * NUM_VALIDATION
    # The finetune stage scores the unfolded student, the stage the folded
    # static network: float rounding may move one near-tie.
    assert abs(correct - reported) <= 1, (correct, reported, predicted)
    assert len(set(predicted)) >= 2 and correct >= NUM_VALIDATION // 2, predicted
    assert report["tasks"][NAME]["decathlon_test"] == {
        "path": f"{TASK_DIR}/decathlon_test_predictions.json", "images": NUM_VALIDATION}
    assert report["decathlon_submission"] == {"path": "decathlon_results.json",
                                              "domains": ["svhn"], "images": NUM_VALIDATION}
    # Category ids of the challenge (svhn is the 8th domain): 80000001..80000010.
    records = json.loads(open(f"{workdir}/decathlon_results.json").read())
    assert "decathlon_results.json: the challenge's results file, 24" in open(
        f"{workdir}/report.md").read()
    assert all(80_000_001 <= r["category_id"] <= 80_000_010 for r in records)


def test_a_second_run_skips_and_a_changed_annotation_file_is_checked(fake, submitted, caplog,
                                                                     tmp_path):
    strategy = tf.distribute.get_strategy()
    only_submission = dataclasses.replace(submitted, stages=("submission",))
    with caplog.at_level("INFO", logger="absl"):
        stages.run(only_submission, strategy)
    assert any("submission stage already done" in r.getMessage() for r in caplog.records)

    # An annotation file that lacks two of the test images: the predictions
    # are out of date (another fingerprint) and the mismatch is one line.
    other = _config(submitted.workdir, fake.write_annotations(tmp_path / "fewer", drop=2),
                    stages=("submission",))
    with pytest.raises(stages.StageError, match="is not in the annotation file"):
        stages.run(other, strategy)
    # The earlier predictions are still there, whole.
    task = decathlon.read_task_predictions(
        f"{submitted.workdir}/{TASK_DIR}/decathlon_test_predictions.json")
    assert len(task.predictions) == NUM_VALIDATION


def test_submission_needs_decathlon_tasks_and_their_annotation_files(tmp_path):
    from nettailor_tf.settings.config import ConfigError

    with pytest.raises(ConfigError, match="'digits' is not a Visual Decathlon task"):
        _config(tmp_path, str(tmp_path), tasks=("digits",))
    with pytest.raises(ConfigError, match="needs --decathlon_annotations"):
        _config(tmp_path, None)
    with pytest.raises(ConfigError, match="no svhn_test_stripped.json in it"):
        _config(tmp_path, str(tmp_path))
