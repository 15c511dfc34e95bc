"""The main job (python -m effops) end to end on this machine."""
import pytest

from effops.__main__ import main


@pytest.mark.slow
def test_main_job_runs_and_matches(capsys, monkeypatch):
    monkeypatch.setenv("EFFOPS_BACKEND", "reference")  # the interpreter would take minutes for timing loops
    rc = main(["--model", "vovnet27_slim", "--size", "32", "--batch", "1", "--no-compile"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "7 blocks swapped (4 OSA, 3 conv+BN+act), 0 skipped" in out and "MATCH" in out
    assert "eager" in out and "effops" in out and "ms / forward" in out


@pytest.mark.slow
def test_main_job_v2(capsys, monkeypatch):
    monkeypatch.setenv("EFFOPS_BACKEND", "reference")
    rc = main(["--model", "vovnet27_slim", "--v2", "--size", "32", "--batch", "1", "--no-compile"])
    out = capsys.readouterr().out
    assert rc == 0 and "4 OSA" in out and "MATCH" in out, out
    with pytest.raises(SystemExit, match="--v2 applies to the built-in VoVNets"):
        main(["--model", "resnet18", "--v2"])
