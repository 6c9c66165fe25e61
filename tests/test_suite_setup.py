"""The test suite's own machinery: module fixtures of an `xdist_group` run once per run."""

import pytest
from conftest import once_per_run


def test_a_group_runs_on_one_worker(pytester, monkeypatch):
    """Under `-n 2 --dist loadgroup` (pyproject's addopts) the tests of one `xdist_group` share a
    worker, so their module fixture runs once: pytest 9.2 with pytest-xdist 3.8 ignores the group
    (xdist renames `item._nodeid`, which pytest 9.2 no longer reads) and would run it twice."""
    runs = pytester.path / "fixture-runs"
    # the grouped tests come first: a load scheduler deals them out 2 and 2 to the two workers
    pytester.makepyfile(test_grouped=f"""
        import os
        import pytest

        @pytest.fixture(scope="module")
        def once():
            with open({str(runs)!r}, "a") as f:
                f.write(os.environ["PYTEST_XDIST_WORKER"] + "\\n")

        @pytest.mark.xdist_group("group")
        @pytest.mark.parametrize("i", range(4))
        def test_grouped(once, i):
            pass

        @pytest.mark.parametrize("i", range(4))
        def test_free(i):
            pass
    """)
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")  # xdist alone: seconds, not tens
    monkeypatch.delenv("PYTEST_ADDOPTS", raising=False)  # options of plugins not loaded there
    result = pytester.runpytest_subprocess("-p", "xdist", "-n", "2", "--dist", "loadgroup",
                                           "-p", "no:cacheprovider")
    result.assert_outcomes(passed=8)
    assert len(runs.read_text().split()) == 1, runs.read_text()


def test_a_fixture_that_runs_twice_fails(tmp_path_factory):
    once_per_run(tmp_path_factory, "guard-test")
    with pytest.raises(pytest.fail.Exception, match="guard-test ran a second time.*xdist_group"):
        once_per_run(tmp_path_factory, "guard-test")
