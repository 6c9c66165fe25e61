"""The closing lines of training name the folders the final validation really writes."""

from jaxmamba.rundir import FINAL_VALIDATION_DIR
from jaxmamba.train.validate import format_results, set_folder


def test_closing_lines_name_each_sets_folder(tmp_path):
    results = {"validation": {"a": 0.75, "b": 0.5, "mean": 0.625},
               "test": {"a": 0.5, "b": 0.25, "mean": 0.375}}
    lines = format_results(results, tmp_path).splitlines()
    assert lines[0] == "final validation Dice: mean 0.6250 (a 0.7500, b 0.5000)"
    assert lines[2] == "final test Dice: mean 0.3750 (a 0.5000, b 0.2500)"
    for line, name in ((lines[1], "validation"), (lines[3], "test")):
        # where they are written
        assert set_folder(tmp_path, name) == tmp_path / FINAL_VALIDATION_DIR / name
        assert f"in {tmp_path / FINAL_VALIDATION_DIR / name}/:" in line and "summary.json" in line
    assert "no held-out cases" in format_results({}, tmp_path)
