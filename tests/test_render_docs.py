"""Every measured table of the documentation is its committed JSON, rendered.

`python benchmarks/render_docs.py` renders each results file of docs/results/
into its page (or a marked region of one); these tests fail when a table and
its JSON disagree, when a results file has no table or a marked region no
results file, and when the README stops being a short guide.

Pure Python, no TensorFlow: well under a second.
"""
import glob
import json
import os
import re
import shutil
import sys

import pytest

ROOT = os.path.realpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import render_docs  # noqa: E402
import renderers  # noqa: E402


def _read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def test_every_rendered_table_equals_its_json():
    stale = render_docs.render_all(check=True)
    assert not stale, (f"these tables differ from their results files: {stale}; run "
                       f"`python benchmarks/render_docs.py` (or fix the JSON, not the table)")


def _copy_of_the_docs(tmp_path, monkeypatch):
    for table in render_docs.TABLES:
        for name in (table.results, table.target):
            os.makedirs(tmp_path / os.path.dirname(name), exist_ok=True)
            shutil.copy(os.path.join(ROOT, name), tmp_path / name)
    monkeypatch.setattr(render_docs, "ROOT", str(tmp_path))


def test_a_figure_changed_in_the_json_or_the_table_alone_is_caught(tmp_path, monkeypatch):
    _copy_of_the_docs(tmp_path, monkeypatch)
    results = tmp_path / "docs" / "results" / "seed_study.json"
    study = json.loads(results.read_text(encoding="utf-8"))
    before = study["tasks"]["digits"]["pruned"]["mean"]
    study["tasks"]["digits"]["pruned"]["mean"] += 0.01
    results.write_text(json.dumps(study), encoding="utf-8")
    stale = render_docs.render_all(check=True)
    assert stale == ["docs/seed_study.md (docs/results/seed_study.json)",
                     "README.md#results (docs/results/seed_study.json)"]
    # Rendering rewrites exactly those, and the prose around a region stays.
    readme_before = (tmp_path / "README.md").read_text(encoding="utf-8")
    assert render_docs.render_all() == stale and render_docs.render_all(check=True) == []
    readme = (tmp_path / "README.md").read_text(encoding="utf-8")
    assert f"{100 * (before + 0.01):.2f} ±" in readme
    assert f"{100 * before:.2f} ±" in readme_before
    outside = re.compile(r"<!-- begin rendered: results -->.*<!-- end rendered: results -->",
                         re.S)
    assert outside.sub("", readme) == outside.sub("", readme_before)
    # A table edited by hand is caught too.
    page = tmp_path / "docs" / "performance.md"
    text = page.read_text(encoding="utf-8")
    # The float32 bundle's size, whatever the JSON holds.
    edited = re.sub(r"(\| float32 \| )[\d.]+ MB", r"\g<1>99.99 MB", text, count=1)
    assert edited != text
    page.write_text(edited, encoding="utf-8")
    assert render_docs.render_all(check=True) == [
        "docs/performance.md#bundle (docs/results/bundle.json)"]


def test_a_region_without_its_markers_is_an_error(tmp_path, monkeypatch):
    _copy_of_the_docs(tmp_path, monkeypatch)
    readme = tmp_path / "README.md"
    readme.write_text(readme.read_text(encoding="utf-8").replace(
        "<!-- end rendered: results -->", ""), encoding="utf-8")
    with pytest.raises(render_docs.RenderError, match="README.md: needs exactly one pair"):
        render_docs.render_all(check=True)
    assert render_docs.main(["--check"]) == 2


def test_every_results_file_and_every_marked_region_is_in_the_registry():
    registered = {t.results for t in render_docs.TABLES}
    on_disk = {os.path.relpath(p, ROOT)
               for p in glob.glob(os.path.join(ROOT, "docs", "results", "*.json"))}
    assert on_disk <= registered, f"results files nothing renders: {on_disk - registered}"
    regions = {(t.target, t.region) for t in render_docs.TABLES if t.region}
    pages = [os.path.join(ROOT, "README.md")] + glob.glob(os.path.join(ROOT, "docs", "*.md"))
    for page in pages:
        for name in re.findall(r"^<!-- begin rendered: (\S+) -->$", _read(page), re.M):
            assert (os.path.relpath(page, ROOT), name) in regions, (page, name)


def test_every_results_file_names_its_command_machine_and_date():
    for table in render_docs.TABLES:
        results = json.loads(_read(os.path.join(ROOT, table.results)))
        assert results.get("machine"), table.results
        rows = results.get("rows") if isinstance(results.get("rows"), list) else []
        for key in ("command", "date"):
            assert results.get(key) or (rows and all(r.get(key) for r in rows)), \
                (table.results, key)


def test_the_seed_study_renders_from_either_form_of_its_results():
    study = json.loads(_read(os.path.join(ROOT, "docs", "results", "seed_study.json")))
    as_lines = dict(study, rows=[{"task": t, **row} for t, row in study["tasks"].items()])
    del as_lines["tasks"]
    assert renderers.seed_study_page(as_lines) == renderers.seed_study_page(study)


def test_development_runs_show_the_validation_loss_only_where_collected():
    older = json.loads(_read(os.path.join(ROOT, "docs", "results", "finetune_plateau.json")))
    newer = json.loads(_read(os.path.join(ROOT, "docs", "results", "finetune_shorter.json")))
    assert "validation loss" not in renderers.development_runs_table(older, "a.json")
    table = renderers.development_runs_table(newer, "b.json")
    row = next(line for line in table.splitlines() if line.startswith("| starting rate"))
    loss = next(r for r in newer["rows"] if r["label"] == "starting rate 0.001")
    assert "validation loss" in table and f"| {loss['pruned_val_loss']:.4f} |" in row


def test_the_machine_is_described_by_model_and_cores():
    assert f"{os.cpu_count()} cores" in renderers.machine()


# --- the README as a guide -------------------------------------------------------------

README = os.path.join(ROOT, "README.md")


def test_the_readme_is_short_and_keeps_no_diary():
    text = _read(README)
    assert len(text.splitlines()) <= 200
    assert not re.search(r"\b\d{1,2}:\d{2}\b", text), "a time of day"
    for command in ('pip install -e . && python -m nettailor_tf.main '
                    '--flagfile=flags/quickstart.cfg',
                    'pip install -e ".[test]" && python -m pytest'):
        assert f"\n{command}\n" in text
    for must in ("--helpfull", "nettailor_tf.predict", "folder:", "tfds:", "docs/",
                 "<!-- begin rendered: results -->"):
        assert must in text, must


def _python_blocks(text):
    return re.findall(r"```python\n(.*?)```", text, re.S)


def test_the_readme_bundle_snippet_is_the_one_the_deploy_test_runs():
    """tests/test_stages_deploy.py runs BUILD.md's marked snippet on a real bundle;
    the README shows the same code."""
    build = re.search(r"<!-- python-bundle-snippet[^\n]*-->\n```python\n(.*?)```",
                      _read(os.path.join(ROOT, "BUILD.md")), re.S).group(1)
    assert build in _python_blocks(_read(README))


def test_the_readme_picture_is_committed():
    for target in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", _read(README)):
        assert os.path.isfile(os.path.join(ROOT, target)), target
