"""scripts/mutants.py (make mutants): the list matches the code, which tests cover a module, stale entries, and a
round on a tiny package of its own."""

import importlib.util
import subprocess
import sys
import textwrap

import pytest
from conftest import ROOT

spec = importlib.util.spec_from_file_location("mutants", ROOT / "scripts" / "mutants.py")
mutants = importlib.util.module_from_spec(spec)
sys.modules["mutants"] = mutants  # its dataclasses look their module up
spec.loader.exec_module(mutants)


def write(root, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(textwrap.dedent(text))


def test_every_entry_of_the_list_matches_the_code():
    """A change to a listed line makes its entry stale: update scripts/mutants.yaml with the code."""
    entries = mutants.load_mutations(ROOT / mutants.DEFAULT_LIST)
    assert len(entries) >= 3 * len({m.file for m in entries})  # three mistakes per module at least
    assert {m.name: p for m in entries if (p := mutants.problems(m))} == {}


def test_a_module_is_covered_by_its_mirror_then_the_tests_that_import_or_name_it(tmp_path):
    write(tmp_path, {
        "llmtrain/data/cut.py": "",
        "tests/data/test_cut.py": "",
        "tests/data/test_other.py": "from llmtrain.data import cut\n",
        "tests/run/test_a.py": "def test():\n    from llmtrain.data.cut import trim\n",
        "tests/run/test_b.py": "def test(monkeypatch):\n    monkeypatch.setattr('llmtrain.data.cut.trim', None)\n",
        "tests/run/test_c.py": "from llmtrain.data.cutter import trim\nimport llmtrain.data\n",
        "tests/test_d.py": "import llmtrain.data.cut\n",
    })
    assert mutants.covering_tests("llmtrain/data/cut.py", tmp_path) == (
        "tests/data/test_cut.py", "tests/data/test_other.py", "tests/run/test_a.py", "tests/run/test_b.py",
        "tests/test_d.py")
    assert mutants.covering_tests("llmtrain/data/cutter.py", tmp_path) == ("tests/run/test_c.py",)


def test_an_entry_is_stale_unless_its_original_occurs_once_and_its_mutant_compiles(tmp_path):
    write(tmp_path, {"llmtrain/cut.py": "a = 1\nb = 1\nc = (2)\n", "tests/test_cut.py": ""})

    def problems(original: str, replacement: str = "0", tests=("tests/test_cut.py",)) -> list[str]:
        return mutants.problems(mutants.Mutation("llmtrain/cut.py", 1, original, replacement, "", tests), tmp_path)

    assert problems("a = 1") == []
    assert problems("= 1") == ["its original occurs 2 times in llmtrain/cut.py, not once"]
    assert problems("d = 1") == ["its original occurs 0 times in llmtrain/cut.py, not once"]
    assert problems("(2)", "(2") == ["the mutated file does not compile ('(' was never closed, line 3)"]
    assert problems("a = 1", "a = 1") == ["its replacement is its original"]
    assert problems("a = 1", tests=("tests/test_gone.py",)) == ["its test file tests/test_gone.py does not exist"]
    assert problems("a = 1", tests=()) == [
        "no test file covers llmtrain/cut.py: give the entry (or its module) `tests`"]


def test_the_list_format_names_the_entry_that_breaks_it(tmp_path):
    write(tmp_path, {"llmtrain/cut.py": "a = 1\n", "tests/test_cut.py": "", "tests/test_x.py": "",
                     "list.yaml": """\
                         llmtrain/cut.py:
                           tests: [tests/test_x.py]
                           mutations:
                           - {original: 'a = 1', replacement: 'a = 2', description: one   more}
                           - {original: 'a = 1', replacement: 'a = 0', description: zero, tests: [tests/test_cut.py]}
                           - {original: 'a = 1', replace: 'a = 2', description: typo}
                         """})
    with pytest.raises(mutants.ListError, match=r"llmtrain/cut.py#3: unknown keys \['replace'\], missing keys "
                                                r"\['replacement'\]"):
        mutants.load_mutations(tmp_path / "list.yaml", tmp_path)
    text = (tmp_path / "list.yaml").read_text()
    (tmp_path / "list.yaml").write_text(text[: text.index("  - {original: 'a = 1', replace:")])
    first, second = mutants.load_mutations(tmp_path / "list.yaml", tmp_path)
    assert (first.name, first.description, first.tests) == ("llmtrain/cut.py#1", "one more", ("tests/test_x.py",))
    assert (second.name, second.tests) == ("llmtrain/cut.py#2", ("tests/test_cut.py",))
    assert mutants.select([first, second], ["zero"]) == [second]
    assert mutants.select([first, second], [r"#1$"]) == [first]
    assert mutants.select([first, second], []) == [first, second]


def test_a_mutation_is_undone_whatever_its_tests_do(tmp_path):
    write(tmp_path, {"llmtrain/cut.py": "a = 1\n"})
    mutation = mutants.Mutation("llmtrain/cut.py", 1, "a = 1", "a = 2", "", ())
    with pytest.raises(KeyboardInterrupt), mutants.mutated(tmp_path, mutation):
        assert (tmp_path / "llmtrain/cut.py").read_text() == "a = 2\n"
        raise KeyboardInterrupt
    assert (tmp_path / "llmtrain/cut.py").read_text() == "a = 1\n"


@pytest.mark.slow
def test_a_round_on_a_tiny_package_finds_the_caught_the_missed_and_the_stale(tmp_path):
    """Its own llmtrain in a git repository: the copy's package is the one the tests import (the installed
    llmtrain has no `calc`), a test that fails already is left out, and the report gives the figures."""
    write(tmp_path, {
        "llmtrain/__init__.py": "",
        "llmtrain/calc.py": """\
            def add(a, b):
                return a + b


            def half(a):
                return a // 2
            """,
        "tests/test_calc.py": """\
            from llmtrain.calc import add, half


            def test_add():
                assert add(2, 3) == 5


            def test_half_already_fails():
                assert half(4) == 3
            """,
        "list.yaml": """\
            llmtrain/calc.py:
              mutations:
              - {original: 'a + b', replacement: 'a - b', description: a sign}
              - {original: 'a // 2', replacement: 'a // 3', description: a constant}
              - {original: 'a * b', replacement: 'a + b', description: gone}
            """,
    })
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    entries = mutants.load_mutations(tmp_path / "list.yaml", tmp_path)
    result = mutants.run_round(entries, tmp_path, slow=False, jobs=1, timeout=120)
    assert [(o.status, o.tier) for o in result.outcomes] == [("caught", "fast"), ("missed", ""), ("stale", "")]
    assert result.outcomes[0].detail.startswith("tests/test_calc.py::test_add")
    assert result.left_out == ["tests/test_calc.py::test_half_already_fails"]
    assert (tmp_path / "llmtrain/calc.py").read_text().count("a + b") == 1
    text = mutants.report(result, "python scripts/mutants.py")
    assert "- caught by the fast tier: 1 of 2 (50%)" in text
    assert "- `llmtrain/calc.py#2`: a constant" in text
    assert "- `llmtrain/calc.py#3`: its original occurs 0 times in llmtrain/calc.py, not once" in text
