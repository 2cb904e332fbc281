"""The command line's first words: `--help` names llmtrain, lists the groups one line each, gives examples."""

import pytest
from conftest import ROOT, run_cli


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
