"""Which files each training stage reads and writes."""
import dataclasses
import json

from nettailor_tf.run.report import Report
from nettailor_tf.run.workdir import Workdir
from nettailor_tf.settings.config import Config
from nettailor_tf.stages import provenance


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


def _teacher_files(tmp_path):
    weights = tmp_path / "tasks" / "t" / "teacher.weights.h5"
    checkpoints = tmp_path / "tasks" / "t" / "teacher_ckpt"
    checkpoints.mkdir(parents=True)
    (checkpoints / "ckpt-3.index").write_bytes(b"c")
    return weights, checkpoints


def test_a_changed_setting_redoes_a_finished_stage_and_names_its_flag(tmp_path, caplog):
    paths = Workdir(str(tmp_path))
    report = Report(str(tmp_path), "tiny", 16)
    weights, _ = _teacher_files(tmp_path)
    weights.write_bytes(b"w")
    config = Config(workdir=str(tmp_path), tasks=("t",))
    slower = dataclasses.replace(config, teacher=dataclasses.replace(config.teacher,
                                                                     learning_rate=0.001))
    provenance.record(paths, "t", "teacher",
                      {"data": "d", **provenance.settings_identity(config, "teacher")})
    # A setting the teacher does not read leaves it alone.
    other_student = dataclasses.replace(config, complexity_coeff=1.0)
    provenance.refresh(paths, report, "t", "teacher",
                       {"data": "d", **provenance.settings_identity(other_student, "teacher")})
    assert weights.exists()
    with caplog.at_level("WARNING", logger="absl"):
        provenance.refresh(paths, report, "t", "teacher",
                           {"data": "d", **provenance.settings_identity(slower, "teacher")})
    assert not weights.exists()
    assert "the teacher stage's --teacher_lr changed since it ran; redoing it" in caplog.text


def test_checkpoints_written_under_other_settings_are_not_resumed(tmp_path, caplog):
    """A run that diverged at one learning rate, rerun at another, starts
    the stage over instead of resuming the diverged run's checkpoints."""
    paths = Workdir(str(tmp_path))
    report = Report(str(tmp_path), "tiny", 16)
    _, checkpoints = _teacher_files(tmp_path)
    config = Config(workdir=str(tmp_path), tasks=("t",))
    identity = {"data": "d", **provenance.settings_identity(config, "teacher")}
    provenance.refresh(paths, report, "t", "teacher", identity)  # the first run starts
    provenance.refresh(paths, report, "t", "teacher", identity)  # resumed as it was
    assert checkpoints.exists()
    lower = dataclasses.replace(config, teacher=dataclasses.replace(config.teacher,
                                                                    learning_rate=0.001))
    with caplog.at_level("WARNING", logger="absl"):
        provenance.refresh(paths, report, "t", "teacher",
                           {"data": "d", **provenance.settings_identity(lower, "teacher")})
    assert not checkpoints.exists()
    assert "checkpoints were written with other --teacher_lr; starting the stage over" \
        in caplog.text


def test_a_record_without_settings_is_kept_and_says_it_cannot_check_them(tmp_path, caplog):
    """Workdirs from before settings were recorded: their stages stay done,
    and the log says that a changed setting goes unnoticed for them."""
    paths = Workdir(str(tmp_path))
    report = Report(str(tmp_path), "tiny", 16)
    weights, _ = _teacher_files(tmp_path)
    weights.write_bytes(b"w")
    provenance.record(paths, "t", "teacher", {"data": "d", "plateau": {"eval_steps": 40}})
    config = Config(workdir=str(tmp_path), tasks=("t",))
    with caplog.at_level("WARNING", logger="absl"):
        provenance.refresh(paths, report, "t", "teacher",
                           {"data": "d", **provenance.settings_identity(config, "teacher")})
    assert weights.exists()
    assert "recorded by an earlier version without its settings" in caplog.text
    provenance.refresh(paths, report, "t", "teacher",
                       {"data": "other", **provenance.settings_identity(config, "teacher")})
    assert not weights.exists()  # other data is still seen
