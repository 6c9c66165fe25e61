"""Tests that need the data outside the repository (`shared/`): without it they skip, saying what
it is and how to get it, except in CI (CI=true), where they fail."""

import pytest
from conftest import require_shared


@pytest.mark.parametrize("what, named", [
    ("reference", ("PyTorch reference",)),
    ("datasets", ("MSD Hippocampus", "nnUNetv2_convert_MSD_dataset")),
])
def test_missing_shared_folder_skips_outside_ci_and_fails_in_ci(tmp_path, monkeypatch, what,
                                                                named):
    missing = tmp_path / what
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception) as skipped:
        require_shared(missing, what)
    for text in (*named, "JAXMAMBA_SHARED", str(missing)):
        assert text in str(skipped.value), (text, skipped.value)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true: CI must provide it"):
        require_shared(missing, what)
    missing.mkdir()
    assert require_shared(missing, what) == missing
