"""The command line's first words: `--help` names llmtrain, lists the groups one line each, gives examples."""

import pytest
from conftest import ROOT, TINY, compose, run_cli


@pytest.mark.slow
def test_help_introduces_llmtrain_its_groups_and_three_examples(tmp_path):
    result = run_cli(["--help"], cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    text = result.stdout
    assert text.startswith("llmtrain: train and fine-tune GPT-style language models")
    assert "powered by Hydra" not in text and "== Config ==" not in text  # not the whole composed config
    groups = sorted(p.name for p in (ROOT / "conf").iterdir() if p.is_dir())
    for group in groups:  # one line each, with its options
        [line] = [ln for ln in text.splitlines() if ln.startswith(f"{group}: ")]
        options = sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml"))
        assert line == f"{group}: {', '.join(options)}"
    examples = [ln for ln in text.splitlines() if ln.strip().startswith("python -m llmtrain") and "#" in ln]
    assert len(examples) == 3
    assert "experiment" in groups and "debug" in groups
    assert not (tmp_path / "outputs").exists()


def test_one_line_errors_cleans_up_before_its_line(capsys, monkeypatch):
    """The command line's clean-up (an unused run dir) runs on a user's mistake only, and not under LLMTRAIN_DEBUG,
    which keeps every file for the traceback."""
    from llmtrain.errors import UserError, one_line_errors

    monkeypatch.delenv("LLMTRAIN_DEBUG", raising=False)
    done = []
    with pytest.raises(SystemExit) as e, one_line_errors(cleanup=lambda: done.append(1)):
        raise UserError("bad value: give another")
    assert e.value.code == 2 and done == [1]
    assert capsys.readouterr().err == "error: bad value: give another\n"
    with one_line_errors(cleanup=lambda: done.append(2)):
        pass
    monkeypatch.setenv("LLMTRAIN_DEBUG", "1")
    with pytest.raises(UserError), one_line_errors(cleanup=lambda: done.append(3)):
        raise UserError("bad value")
    assert done == [1]


@pytest.mark.slow
def test_a_mistake_leaves_no_run_dir(tmp_path):
    result = run_cli(["model.n_layers=0"], cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == "error: model.n_layers must be a positive integer, got 0"
    assert not (tmp_path / "outputs").exists()  # Hydra made the run dir; the clean-up removed it


def test_the_command_line_checks_the_memory_before_the_recipe_starts(tmp_path, monkeypatch, capsys):
    """main as Hydra calls it, with the composed config: a run that cannot fit ends in one line, its run dir gone."""
    from llmtrain import cli

    monkeypatch.delenv("LLMTRAIN_DEBUG", raising=False)
    from llmtrain.run import rundir

    monkeypatch.setattr(rundir, "_claims", {})
    run_dir = rundir.claim(tmp_path / "run").path  # as the RunDirs callback claims it before Hydra writes
    (run_dir / ".hydra").mkdir()  # what Hydra writes before main starts
    (tmp_path / "keep.txt").write_text("")
    with pytest.raises(SystemExit) as e:
        cli.main.__wrapped__(compose([*TINY, "perf.memory_gb=0.001"], run_dir))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the run needs about ") and err.count("\n") == 1, err
    assert " GiB per process (weights " in err and " but perf.memory_gb=0.001 allows 0.001 GiB: lower " in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
