"""course/course.py: student copies whose listed function bodies raise NotImplementedError, everything else intact; and
its rule (a student copy fails exactly its assignment's marked tests, at the task), checked cheaply here and in
full by CI (`python course/course.py --check all`)."""
import ast
import importlib
import inspect
import os
import subprocess
import sys
import types
import xml.etree.ElementTree as ET

import pytest

from course import course

SOURCE = '''
class Norm:
    def forward(self, x):
        """Normalise x."""
        # the paper's equation 3
        y = x * 2  # not a hint
        return y


def helper(a):
    return a + 1
'''


def test_strip_keeps_signature_docstring_and_comments_and_raises_naming_the_task():
    out = course.strip(SOURCE, {"Norm.forward": "x / |x|"}, "decoder")
    tree = ast.parse(out)
    method = tree.body[0].body[0]
    assert ast.get_docstring(method) == "Normalise x." and "# the paper's equation 3" in out
    assert "y = x * 2" not in out and "not a hint" not in out and "return a + 1" in out
    namespace = {}
    exec(out, namespace)
    with pytest.raises(NotImplementedError, match="decoder: implement Norm.forward: x / |x|"):
        namespace["Norm"]().forward(1)
    assert namespace["helper"](1) == 2


def test_every_listed_function_exists_and_has_a_body_to_strip():
    for name, spec in course.ASSIGNMENTS.items():
        for target in spec["functions"]:
            file, qualname = target.split(":")
            first, last, _ = course.function_body(ast.parse((course.ROOT / file).read_text()), qualname)
            assert first <= last, target


@pytest.fixture(scope="module")
def data_copy(tmp_path_factory):
    """The student copy of `data`, the assignment whose marked tests are the cheapest."""
    return course.make_copy(["data"], tmp_path_factory.mktemp("course") / "copy")


def test_student_copy_is_a_fresh_tree_with_a_handout(data_copy):
    copy = data_copy
    assert not (copy / ".git").exists() and (copy / "HANDOUT_data.md").is_file()
    assert "pytest -q -m data" in (copy / "HANDOUT_data.md").read_text()
    stripped = (copy / "data.py").read_text()
    assert 'raise NotImplementedError("data: implement natural_sequence' in stripped
    assert (copy / "model.py").read_text() == (course.ROOT / "model.py").read_text()
    r = subprocess.run([sys.executable, "-c", "import data, train"], cwd=copy, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr  # imports still work: failures come at the task, not at import


def stripped(name, file, monkeypatch):
    """Module `file` as the student copy of assignment `name` has it, loaded here under its own name for the
    length of the test (monkeypatch puts the real module back)."""
    functions = {spec.split(":")[1]: what for spec, what in course.ASSIGNMENTS[name]["functions"].items()
                 if spec.startswith(f"{file}:")}
    source = course.strip((course.ROOT / file).read_text(), functions, name)
    module = types.ModuleType(file[:-3])
    module.__file__ = str(course.ROOT / file)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    exec(compile(source, module.__file__, "exec"), module.__dict__)
    return module


@pytest.mark.parametrize("name", course.ASSIGNMENTS)
def test_every_stripped_function_raises_not_implemented_error_naming_the_assignment_and_the_task(name, monkeypatch):
    for spec, what in course.ASSIGNMENTS[name]["functions"].items():
        file, qualname = spec.split(":")
        function = stripped(name, file, monkeypatch)
        for part in qualname.split("."):
            function = getattr(function, part)
        required = [p for p in inspect.signature(function).parameters.values()
                    if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        with pytest.raises(NotImplementedError) as raised:  # the body raises before it reads any argument
            function(*[None] * len(required))
        assert str(raised.value) == f"{name}: implement {qualname}: {what}".replace('"', "'")


# a few tests of the `data` copy: the marked ones that cover its functions, and two unmarked neighbours
DATA_TESTS = ["tests/test_data.py",
              "tests/test_train.py::test_targets_are_the_next_tokens_and_the_last_position_is_ignored",
              "tests/test_train.py::test_learning_rate_warms_up_linearly_then_decays_by_cosine_to_min_lr"]


def marks_of(test_or_module):
    marks = getattr(test_or_module, "pytestmark", [])
    return marks if isinstance(marks, list) else [marks]


def test_a_student_copy_fails_its_marked_tests_at_the_task_and_passes_the_others(data_copy, tmp_path):
    """course/course.py's rule on one assignment and a few of its tests (seconds; CI's `course/course.py --check all` runs every
    test for every assignment): each test marked `data` fails with the assignment's NotImplementedError, the
    others pass."""
    report = tmp_path / "report.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-q", f"--junitxml={report}", *DATA_TESTS], cwd=data_copy,
                   capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    marked, others = {}, {}
    for case in ET.parse(report).getroot().iter("testcase"):
        module = importlib.import_module(case.get("classname").split(".")[-1])  # the same test file, here
        function = getattr(module, case.get("name").split("[")[0])
        marks = {m.name for m in marks_of(module) + marks_of(function)}
        failure = next((f"{e.tag}: {e.get('message')}" for e in case if e.tag in ("failure", "error", "skipped")), "")
        (marked if "data" in marks else others)[f"{module.__name__}::{function.__name__}"] = failure
    assert len(marked) >= 5 and len(others) >= 2
    assert all(f.startswith("failure: NotImplementedError: data: implement ") for f in marked.values()), marked
    assert not any(others.values()), others
