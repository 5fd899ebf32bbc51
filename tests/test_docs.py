"""The documentation stands alone and stays true to the code.

- Every relative link in README.md, BUILD.md and docs/*.md reaches a file
  inside the repository (and a heading, where it names one).
- No file of the repository names the team's private notes file.
- Every key the stages write literally, read from their source with `ast`,
  is documented in docs/report_json.md, and every path of
  `nettailor_tf.run.workdir.Workdir` is in its layout.  The keys of a report
  the current code writes (every stage, every variant, the bundle) are
  checked in tests/test_stages_deploy.py, which runs those stages anyway.

Pure Python, no TensorFlow: well under a second.
"""
import ast
import glob
import inspect
import os
import re
import subprocess
from urllib.parse import unquote

import pytest
from report_keys import documented

ROOT = os.path.realpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
DOCS = os.path.join(ROOT, "docs")
REPORT_DOC = os.path.join(DOCS, "report_json.md")


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


# --- links -------------------------------------------------------------------------------

def _markdown_files() -> list[str]:
    return ([os.path.join(ROOT, "README.md"), os.path.join(ROOT, "BUILD.md")]
            + sorted(glob.glob(os.path.join(DOCS, "*.md"))))


_FENCE = re.compile(r"^[ \t]*(```|~~~)[^\n]*\n.*?^[ \t]*\1[ \t]*$", re.M | re.S)
_CODE_SPAN = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def _prose(text: str) -> str:
    """Markdown without fenced code blocks and code spans (their brackets are code)."""
    return _CODE_SPAN.sub("", _FENCE.sub("", text))


def _links(path: str) -> list[str]:
    return [m.group(1) for m in _LINK.finditer(_prose(_read(path)))]


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: str) -> set[str]:
    anchors, seen = set(), {}
    for line in _FENCE.sub("", _read(path)).splitlines():
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            slug = _slug(match.group(1))
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


@pytest.mark.parametrize("path", _markdown_files(), ids=lambda p: os.path.relpath(p, ROOT))
def test_relative_links_reach_a_file_in_the_repository(path):
    problems = []
    for target in _links(path):
        if _SCHEME.match(target):  # https:, mailto: ...
            continue
        name, _, anchor = target.partition("#")
        resolved = (path if not name else
                    os.path.realpath(os.path.join(os.path.dirname(path), unquote(name))))
        if os.path.commonpath([resolved, ROOT]) != ROOT:
            problems.append(f"{target}: outside the repository")
        elif not os.path.exists(resolved):
            problems.append(f"{target}: no such file")
        elif anchor and resolved.endswith(".md") and anchor not in _anchors(resolved):
            problems.append(f"{target}: no heading #{anchor} in {os.path.basename(resolved)}")
    assert not problems, f"{os.path.relpath(path, ROOT)}: {problems}"


def test_the_docs_are_linked_from_the_top_level_files():
    index = os.path.join(DOCS, "README.md")
    pages = {os.path.basename(p) for p in glob.glob(os.path.join(DOCS, "*.md"))} - {"README.md"}
    assert {"method.md", "report_json.md", "platform_notes.md"} <= pages
    assert pages <= {t.partition("#")[0] for t in _links(index)}, "docs/README.md misses a page"
    readme = {t.partition("#")[0] for t in _links(os.path.join(ROOT, "README.md"))}
    assert {"docs/method.md", "docs/report_json.md"} <= readme
    assert any(t.startswith("docs/") for t in _links(os.path.join(ROOT, "BUILD.md")))


def test_the_link_reader_sees_links_and_skips_code():
    text = "[a](x.md) `[b](y.md)` ![c](img/z.png#top)\n```\n[d](w.md)\n```\n"
    assert [m.group(1) for m in _LINK.finditer(_prose(text))] == ["x.md", "img/z.png#top"]
    assert _slug("Deliberate differences from the `published` code!") == \
        "deliberate-differences-from-the-published-code"
    assert _slug("K3. `trainable=False` on a [layer](x.md)") == "k3-trainablefalse-on-a-layer"


# --- the private notes file ----------------------------------------------------------

# Spelled in two parts so that this file does not name it itself.
_NOTES = re.compile(rb"(?<![A-Za-z0-9_])" + re.escape(b"SPEC" + b".md"), re.I)
_NOT_THE_REPOSITORY = {".git", "__pycache__", ".pytest_cache", "runs", "build"}


def _repository_files() -> list[str]:
    """Tracked and untracked files that git does not ignore (a walk without git)."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
            capture_output=True, check=True, timeout=60).stdout.decode("utf-8", "replace")
        files = [os.path.join(ROOT, f) for f in listed.split("\0") if f]
    except (OSError, subprocess.SubprocessError):
        files = []
        for folder, subfolders, names in os.walk(ROOT):
            subfolders[:] = [d for d in subfolders if d not in _NOT_THE_REPOSITORY
                             and not d.endswith(".egg-info")]
            files += [os.path.join(folder, n) for n in names]
    return [f for f in files if os.path.isfile(f)]


def test_no_file_names_the_private_notes():
    files = _repository_files()
    assert os.path.join(ROOT, "docs", "method.md") in files
    naming = []
    for path in files:
        with open(path, "rb") as f:
            if _NOTES.search(f.read()):
                naming.append(os.path.relpath(path, ROOT))
    assert not naming, f"these files name the private notes file: {naming}"


# --- report.json -------------------------------------------------------------------------

def _dict_keys(node, prefix: str, dicts: dict) -> set[str]:
    """Key paths of a literal dict written under `prefix` (names bound to a
    literal dict in the same function, conditional values and comprehensions
    over literal keys included); what is not literal is left to the report a
    run writes (tests/test_stages_deploy.py)."""
    if isinstance(node, ast.Name) and node.id in dicts:
        node = dicts[node.id]
    if isinstance(node, ast.IfExp):
        return _dict_keys(node.body, prefix, dicts) | _dict_keys(node.orelse, prefix, dicts)
    paths = set()
    if isinstance(node, ast.Dict):
        for key, value in zip(node.keys, node.values):
            if key is None:  # **spread: its literal keys land at this level
                if (isinstance(value, ast.Call) and isinstance(value.func, ast.Name)
                        and f"{value.func.id}()" in dicts):  # a helper's literal dict
                    value = dicts[f"{value.func.id}()"]
                paths |= _dict_keys(value, prefix, dicts)
            elif isinstance(key, ast.Constant) and isinstance(key.value, str):
                path = f"{prefix}.{key.value}" if prefix else key.value
                paths.add(path)
                paths |= _dict_keys(value, path, dicts)
    elif (isinstance(node, ast.DictComp) and len(node.generators) == 1
          and isinstance(node.generators[0].iter, (ast.Tuple, ast.List))):
        for element in node.generators[0].iter.elts:
            if isinstance(element, ast.Constant) and isinstance(element.value, str):
                paths.add(f"{prefix}.{element.value}")
    return paths


def _is_report(node, attribute: str) -> bool:
    """`report.<attribute>`."""
    return (isinstance(node, ast.Attribute) and node.attr == attribute
            and isinstance(node.value, ast.Name) and node.value.id == "report")


def _written_key_paths() -> set[str]:
    """Key paths the report code writes literally: `report.set(task, "part", {...})`,
    `report.task(task)["key"] = ...`, `report.data["key"] = ...` and the report's
    initial `self.data = {...}`."""
    sources = [os.path.join(ROOT, "nettailor_tf", "run", "report.py")] + sorted(
        glob.glob(os.path.join(ROOT, "nettailor_tf", "stages", "*.py")))
    trees = [ast.parse(_read(source)) for source in sources]
    # Helpers that return one literal dict (`**training_outcome(result)`), by "name()".
    helpers = {f"{function.name}()": function.body[-1].value for tree in trees
               for function in tree.body if isinstance(function, ast.FunctionDef)
               and isinstance(function.body[-1], ast.Return)
               and isinstance(function.body[-1].value, ast.Dict)}
    paths = set()
    for tree in trees:
        for function in ast.walk(tree):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            dicts = {node.targets[0].id: node.value for node in ast.walk(function)
                     if isinstance(node, ast.Assign) and len(node.targets) == 1
                     and isinstance(node.targets[0], ast.Name) and isinstance(node.value, ast.Dict)}
            dicts.update(helpers)
            for node in ast.walk(function):
                if (isinstance(node, ast.Call) and _is_report(node.func, "set")
                        and len(node.args) == 3 and isinstance(node.args[1], ast.Constant)):
                    prefix = f"tasks.<task>.{node.args[1].value}"
                    paths |= {prefix} | _dict_keys(node.args[2], prefix, dicts)
                if not isinstance(node, ast.Assign):
                    continue
                for target in node.targets:
                    if (isinstance(target, ast.Attribute) and target.attr == "data"
                            and isinstance(target.value, ast.Name) and target.value.id == "self"):
                        paths |= _dict_keys(node.value, "", dicts)
                    if not (isinstance(target, ast.Subscript)
                            and isinstance(target.slice, ast.Constant)
                            and isinstance(target.slice.value, str)):
                        continue
                    base = target.value
                    if isinstance(base, ast.Call) and _is_report(base.func, "task"):
                        path = f"tasks.<task>.{target.slice.value}"
                    elif _is_report(base, "data"):
                        path = target.slice.value
                    else:
                        continue
                    paths |= {path} | _dict_keys(node.value, path, dicts)
    return paths


def test_every_key_the_stages_write_is_documented():
    paths = _written_key_paths()
    assert {"backbone", "tasks", "tasks.<task>.num_classes", "tasks.<task>.student.gate_entropy",
            "tasks.<task>.pruned.vs_teacher", "tasks.<task>.export.tflite_input",
            "tasks.<task>.decathlon_test.images", "decathlon_submission.domains",
            "bundle.latency", "deployment_png", "tasks.<task>.teacher.converged",
            "tasks.<task>.pruned.stopped"} <= paths, "the source reader lost track"
    missing = sorted(paths - documented())
    assert not missing, f"docs/report_json.md does not document: {missing}"


def test_every_workdir_path_is_in_the_documented_layout():
    from nettailor_tf.run import workdir

    text = _read(REPORT_DOC)
    root = os.path.join(os.sep, "W")
    paths = workdir.Workdir(root)
    arguments = {"task": "<task>", "stage": "teacher", "num_universal": "<N>"}
    names = {workdir.SETTINGS_RECORD, workdir.TASKS_FOLDER, ".lock"}
    for name, member in inspect.getmembers(workdir.Workdir):
        if name.startswith("_") or name in ("check_settings", "lock", "relative", "task_dir"):
            continue
        if isinstance(member, property):
            value = getattr(paths, name)
        else:
            parameters = list(inspect.signature(member).parameters)[1:]
            value = getattr(paths, name)(*(arguments[p] for p in parameters))
        value = getattr(value, "path", value)  # a Ledger
        names.add(os.path.basename(value))
    assert {"report.json", "ledger.json", "n<N>_ckpt", "teacher_ckpt", "export"} <= names
    missing = sorted(n for n in names if n not in text)
    assert not missing, f"docs/report_json.md's workdir layout lacks: {missing}"
