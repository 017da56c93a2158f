"""Shared fixtures. `quick_zoo` builds the small demo zoo once per test session (about half a minute
on 2 CPU cores) in a temporary folder; page, CLI and method tests all evaluate against it."""
from __future__ import annotations

import os
import tempfile

import pytest

# Every run the tests record (CLI commands, app pages, servers they start) goes to a run store of the
# test session's own, never a user's ~/.local/share/merge-explorer.
os.environ["MERGE_EXPLORER_HOME"] = tempfile.mkdtemp(prefix="merge-explorer-test-home-")


@pytest.fixture(scope="session")
def quick_zoo(tmp_path_factory):
    """A `--quick` demo zoo (4 tasks, small splits), as an `engine.zoo.Zoo` (its folder is `.root`)."""
    from engine.zoo.build import build_zoo

    return build_zoo(tmp_path_factory.mktemp("quick_zoo") / "zoo", quick=True)


@pytest.fixture(scope="session")
def quick_suite(quick_zoo):
    """The quick zoo as the engine's shared task suite (`ZooSuite.of`): what evaluation, continual merging,
    interference and RI take."""
    from engine.zoo.suite import ZooSuite

    return ZooSuite.of(quick_zoo)
