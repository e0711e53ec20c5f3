"""Records name the commit they ran at, also from a copied tree without git history."""

import subprocess

from harness import records


def test_git_describe_without_history_uses_the_environment(monkeypatch):
    class Done:
        stdout = "HEAD\n"  # what `git rev-parse HEAD` prints where there is no history

    monkeypatch.setattr(subprocess, "run", lambda *a, **k: Done())
    records.git_describe.cache_clear()
    try:
        monkeypatch.delenv("QVLM_GIT_COMMIT", raising=False)
        assert records.git_describe() is None
        records.git_describe.cache_clear()
        monkeypatch.setenv("QVLM_GIT_COMMIT", "0123abc")
        assert records.git_describe() == {"commit": "0123abc", "dirty": None}
    finally:
        records.git_describe.cache_clear()


def test_git_describe_in_this_checkout(monkeypatch):
    monkeypatch.delenv("QVLM_GIT_COMMIT", raising=False)
    records.git_describe.cache_clear()
    try:
        got = records.git_describe()
        if got is not None:  # a source tree without .git (an sdist) has no commit
            assert len(got["commit"]) == 40 and isinstance(got["dirty"], bool)
        # the environment names the commit even where git history exists (it may be stale there)
        records.git_describe.cache_clear()
        monkeypatch.setenv("QVLM_GIT_COMMIT", "feedbeef")
        assert records.git_describe() == {"commit": "feedbeef", "dirty": None}
    finally:
        records.git_describe.cache_clear()
