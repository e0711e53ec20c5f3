"""The README's Layout section names every module and package there is, and nothing that isn't."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("harness", "harness/quant", "harness/models", "harness/perf", "harness/kernels",
            "harness/executors", "harness/report", "baselines", "methods", "tasks")
TOKEN = re.compile(r"(?<![\w/.-])([\w.-]+(?:\.py|\.yaml|/))(?![\w.-])")


def _layout() -> dict[str, set[str]]:
    text = (REPO / "README.md").read_text()
    block = re.search(r"## Layout\n+```\n(.*?)```", text, re.S).group(1)
    entries: dict[str, set[str]] = {}
    current = None
    for line in block.splitlines():
        if line and not line.startswith(" "):
            current = line.split()[0].rstrip("/")
            entries[current] = set()
            rest = line[len(line.split()[0]):]
        else:
            rest = line
        entries[current].update(TOKEN.findall(rest))
    return entries


def _children(pkg: str) -> set[str]:
    out = set()
    for p in (REPO / pkg).iterdir():
        if p.name.startswith(("__", ".")) or p.name.endswith(".egg-info"):
            continue
        if p.is_dir():
            out.add(p.name + "/")
        elif p.suffix in (".py", ".yaml"):
            out.add(p.name)
    return out


def test_layout_names_every_module_and_package():
    entries = _layout()
    for pkg in PACKAGES:
        assert pkg in entries, f"README Layout has no line for {pkg}/"
        subpackages = {e[len(pkg) + 1:] + "/" for e in entries if e.startswith(pkg + "/")}
        missing = _children(pkg) - entries[pkg] - subpackages
        assert not missing, f"README Layout misses {sorted(missing)} in {pkg}/"


def test_layout_names_nothing_that_does_not_exist():
    for pkg, names in _layout().items():
        base = REPO / pkg
        if not base.is_dir():
            assert (REPO / pkg).exists(), f"README Layout names {pkg}, which does not exist"
            continue
        ghosts = [n for n in names if not (base / n.rstrip("/")).exists()
                  and not any((REPO / p / n.rstrip("/")).exists() for p in PACKAGES)
                  and not list(base.rglob(n.rstrip("/")))]
        assert not ghosts, f"README Layout names {ghosts} under {pkg}/, which do not exist"


def _ignored(path: Path) -> bool:
    """Git-ignored (a local wheel folder, build output): not part of a clone, so not in the Layout."""
    import subprocess

    try:
        return subprocess.run(["git", "check-ignore", "-q", str(path)], cwd=REPO).returncode == 0
    except OSError:  # no git: judge by the entries alone
        return False


def test_every_top_level_entry_is_named():
    entries = _layout()
    tracked = {p.name for p in REPO.iterdir() if not p.name.startswith(".git") and p.name not in (
        "README.md", ".venv", ".gitignore") and not p.name.endswith(".egg-info")
        and p.name not in (".pytest_cache", "__pycache__", ".benchmarks") and not _ignored(p)}
    named = set(entries) | {t.rstrip("/") for names in entries.values() for t in names}
    named |= {w for line in (REPO / "README.md").read_text().split("## Layout")[1].splitlines()
              for w in line.split()}
    assert tracked <= named, f"README Layout misses {sorted(tracked - named)}"
