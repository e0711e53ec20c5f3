"""Root conftest: lets ``addopts = --benchmark-skip`` (pyproject.toml) work without pytest-benchmark.

pytest-benchmark is a test/bench extra, not a runtime dependency; where it is absent (a plain
``pip install -e .``) or disabled (``-p no:benchmark``), this registers its ``--benchmark-skip`` as
a no-op so the default test run still starts. Where the plugin is active, it owns the option.
"""


def pytest_addoption(parser, pluginmanager):
    if not pluginmanager.hasplugin("benchmark"):
        parser.addoption("--benchmark-skip", action="store_true", default=False,
                         help="no-op: pytest-benchmark is not active (pip install -e '.[test]')")


def pytest_collection_modifyitems(config, items):
    """Without the plugin, benchmarks (tests using its ``benchmark`` fixture) skip with the fix
    instead of erroring on a missing fixture."""
    if config.pluginmanager.hasplugin("benchmark"):
        return
    import pytest

    skip = pytest.mark.skip(reason="needs pytest-benchmark: pip install -e '.[bench]'")
    for item in items:
        if "benchmark" in getattr(item, "fixturenames", ()):
            item.add_marker(skip)
