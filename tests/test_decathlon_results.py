"""The results-file command line, run as a user runs it (it never imports
TensorFlow, so each run takes about a second)."""
import json
import subprocess
import sys
import zipfile

from nettailor_tf import decathlon


def _run(*args):
    return subprocess.run([sys.executable, "-m", "nettailor_tf.decathlon_results", *args],
                          capture_output=True, text=True, timeout=60)


def _one_error_line(proc, expected):
    assert proc.returncode == 2, proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and expected in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def _predictions(root, domain, predictions):
    folder = root / f"decathlon_{domain}" / f"visual_domain_decathlon_{domain}"
    folder.mkdir(parents=True)
    base = decathlon.CATEGORY_ID_BASE[domain]
    ids = [base + k + 1 for k in range(decathlon.NUM_CLASSES[domain])]
    decathlon.write_task_predictions(str(folder / "decathlon_test_predictions.json"), domain,
                                     predictions, ids)


def test_workdirs_merge_into_a_zip_the_server_takes(tmp_path):
    everything = {d: {1000 * i + 1: i % decathlon.NUM_CLASSES[d], 1000 * i + 2: 1}
                  for i, d in enumerate(decathlon.DOMAINS)}
    for domain, predictions in everything.items():
        _predictions(tmp_path, domain, predictions)
    pattern = str(tmp_path / "decathlon_*" / "*" / "decathlon_test_predictions.json")
    proc = _run(f"--predictions={pattern}", f"--output={tmp_path / 'results.zip'}")
    assert proc.returncode == 0, proc.stderr
    with zipfile.ZipFile(tmp_path / "results.zip") as archive:
        assert archive.namelist() == ["results.json"]
        records = json.loads(archive.read("results.json"))
    assert decathlon.read_submission(records) == everything
    assert "wrote 20 predictions of 10 domains" in proc.stderr


def test_bad_input_is_one_line(tmp_path):
    _predictions(tmp_path, "svhn", {5: 3})
    one = str(tmp_path / "decathlon_svhn" / "visual_domain_decathlon_svhn"
              / "decathlon_test_predictions.json")
    out = f"--output={tmp_path / 'results.json'}"
    _one_error_line(_run(f"--predictions={one}", out), "no predictions for aircraft, cifar100")
    _one_error_line(_run(f"--predictions={one},{one}", out, "--norequire_all_domains"),
                    "both hold 'svhn'")
    _one_error_line(_run(f"--predictions={tmp_path}/nothing/*.json", out),
                    "matches no file")
    _one_error_line(_run(f"--predictions={tmp_path}/missing.json", out), "missing.json")
    _one_error_line(_run(f"--predictions={one}"), "--output is required")
    assert not (tmp_path / "results.json").exists()
    proc = _run(f"--predictions={one}", out, "--norequire_all_domains")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "results.json").read_text()) == [
        {"image_id": 5, "category_id": 80_000_004}]
