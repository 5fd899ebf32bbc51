"""Which files each training stage reads and writes."""
import json

from nettailor_tf.report import Report
from nettailor_tf.stages import provenance
from nettailor_tf.workdir import Workdir


def test_a_stage_is_stale_when_a_file_it_read_changed(tmp_path):
    paths = Workdir(str(tmp_path))
    report = Report(str(tmp_path), "tiny", 16)
    teacher = tmp_path / "tasks" / "t" / "teacher.weights.h5"
    teacher.parent.mkdir(parents=True)
    teacher.write_bytes(b"teacher one")
    student = tmp_path / "tasks" / "t" / "student.npz"
    student.write_bytes(b"student")
    report.set("t", "student", {"accuracy": 0.5})
    identity = {"data": "d1"}
    provenance.record(paths, "t", "student", identity)

    provenance.refresh(paths, report, "t", "student", identity)  # nothing changed
    assert student.exists() and report.get("t", "student")

    teacher.write_bytes(b"teacher two")
    provenance.refresh(paths, report, "t", "student", identity)
    assert not student.exists() and report.get("t", "student") is None
    assert "student" not in json.loads((tmp_path / "tasks" / "t" / "ledger.json").read_text())


def test_other_data_makes_even_the_teacher_stale(tmp_path):
    paths = Workdir(str(tmp_path))
    report = Report(str(tmp_path), "tiny", 16)
    weights = tmp_path / "tasks" / "t" / "teacher.weights.h5"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"w")
    provenance.record(paths, "t", "teacher", {"data": "d1"})
    provenance.refresh(paths, report, "t", "teacher", {"data": "d2"})
    assert not weights.exists()


def test_every_training_stage_names_its_outputs(tmp_path):
    paths = Workdir(str(tmp_path))
    for stage in provenance.TRAINING_ORDER:
        outputs = provenance.outputs(paths, "t", stage)
        assert outputs and all(o.startswith(str(tmp_path / "tasks" / "t")) for o in outputs)
