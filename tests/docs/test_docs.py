"""The documentation stays true: it builds strictly, its generated parts equal their sources, its
links resolve, its commands exist, and it agrees with pyproject.toml and results/summary.json."""
import importlib.util
import json
import os
import re
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest

try:
    import tomllib
except ImportError:  # Python < 3.11: pytest itself depends on tomli there
    import tomli as tomllib

REPO_ROOT = Path(__file__).resolve().parents[2]
README = REPO_ROOT / "README.md"
PAGES = sorted((REPO_ROOT / "docs").rglob("*.md"))
DOCUMENTS = [README, *PAGES]
#: Commands a code block may start with besides the console scripts and the repository's files.
KNOWN_TOOLS = {"pip", "python", "python3", "bash", "caffe", "mkdocs", "dask", "git", "cd", "mkdir", "cp", "export"}


def _make_docs():
    spec = importlib.util.spec_from_file_location("make_docs", REPO_ROOT / "scripts" / "make_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _ids(paths):
    return [str(path.relative_to(REPO_ROOT)) for path in paths]


def _links(text):
    """Markdown link and image targets outside code blocks and code spans."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    return re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", text)


def _slug(heading):
    """Python-Markdown's toc slug of a heading (what MkDocs and the links' #anchors use)."""
    text = re.sub(r"`([^`]*)`", r"\1", heading)
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def _anchors(path):
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {_slug(match) for match in re.findall(r"^#{1,6}\s+(.+?)\s*#*$", text, flags=re.M)}


def _code_lines(text):
    """Shell command lines of the ```bash/sh/shell blocks, continuation lines joined."""
    lines = []
    for block in re.findall(r"```(?:bash|sh|shell|console)\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def _command_problem(line, scripts):
    """Why the command of one code line is not real, or None."""
    words = line.split()
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):  # VAR=value prefixes
        words.pop(0)
    if not words:
        return None
    command = words[0]
    name = command.rsplit("/", 1)[-1] if command.startswith(".venv/bin/") else command
    if name.startswith("caffe-stain-"):
        return None if name in scripts else f"{name} is not a console script of setup.py"
    if command.startswith(("scripts/", "./")):
        return None if (REPO_ROOT / command).is_file() else f"{command} is not a file of the repository"
    if name not in KNOWN_TOOLS:
        return f"{command!r} is neither a console script, a repository file nor a known tool"
    if name in ("bash", "python", "python3") and len(words) > 1 and not words[1].startswith("-"):
        target = words[1]
        return None if (REPO_ROOT / target).is_file() else f"{target} is not a file of the repository"
    return None


def test_mkdocs_builds_strictly(tmp_path):
    if importlib.util.find_spec("mkdocs") is None:
        message = "mkdocs is not installed (the docs extra: pip install -e .[docs])"
        if os.environ.get("CAFFE_STAIN_REQUIRE_CAFFE"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet",
                             "--config-file", str(REPO_ROOT / "mkdocs.yml"), "--site-dir", str(tmp_path / "site")],
                            capture_output=True, text=True, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "reference" / "cli" / "index.html").is_file()


def test_every_page_is_in_the_navigation():
    nav = (REPO_ROOT / "mkdocs.yml").read_text()
    missing = [str(page.relative_to(REPO_ROOT / "docs")) for page in PAGES
               if f": {page.relative_to(REPO_ROOT / 'docs').as_posix()}\n" not in nav]
    assert not missing, f"pages missing from mkdocs.yml's nav: {missing}"


def test_generated_files_equal_their_sources():
    stale = _make_docs().stale_files()
    assert not stale, ("out of date: " + ", ".join(str(p.relative_to(REPO_ROOT)) for p in stale)
                       + "; run python scripts/make_docs.py and commit what it writes")


def test_readme_table_numbers_are_the_summary_s():
    summary = json.loads((REPO_ROOT / "results" / "summary.json").read_text())
    runs = [summary["results_by_seed"][str(seed)] for seed in summary["seeds"]]
    rows = re.findall(r"^\| `([^`]+)` \| ([0-9.]+) ± ([0-9.]+) \|", README.read_text(), flags=re.M)
    assert len(rows) >= 2, "the README's headline table has no rows"
    for row, mean, sd in rows:
        assert row in summary["rows"], f"README row {row} is not in results/summary.json"
        in_domain = np.array([run[row]["in_domain"]["dice"] for run in runs])
        assert float(mean) == round(in_domain.mean(), 3), row
        assert float(sd) == round(in_domain.std(ddof=1), 3), row


def test_readme_is_a_short_landing_page():
    assert len(README.read_bytes()) <= 10 * 1024
    for target in _links(README.read_text()):
        if not target.startswith(("http", "#")):
            assert target.split("#")[0].startswith(("docs/", "results/")), target
    figures = [t for t in _links(README.read_text()) if t.endswith(".png")]
    assert figures and all(t.startswith("results/figures/") for t in figures), figures


@pytest.mark.parametrize("document", DOCUMENTS, ids=_ids(DOCUMENTS))
def test_relative_links_resolve(document):
    for target in _links(document.read_text()):
        if re.match(r"[a-z]+:", target):
            continue
        path_part, _, anchor = target.partition("#")
        path = (document.parent / path_part).resolve() if path_part else document
        assert path.exists(), f"{document.name}: link {target} points to a missing file"
        if anchor and path.suffix == ".md":
            assert anchor in _anchors(path), f"{document.name}: link {target}: no heading #{anchor}"


@pytest.mark.parametrize("document", DOCUMENTS, ids=_ids(DOCUMENTS))
def test_commands_are_real(document):
    scripts = _make_docs().console_scripts()
    text = document.read_text()
    problems = [f"{line}: {problem}" for line in _code_lines(text)
                if (problem := _command_problem(line, scripts))]
    named = set(re.findall(r"caffe-stain-[a-z]+", text)) - {"caffe-stain-augment"}
    problems += [f"{name} is not a console script of setup.py" for name in sorted(named - set(scripts))]
    problems += [f"{path} does not exist" for path in re.findall(r"(?<![\w/.-])(scripts/[\w./-]*\w)", text)
                 if not (REPO_ROOT / path).exists()]
    assert not problems, f"{document.name}: " + "; ".join(problems)


@pytest.mark.parametrize("document", DOCUMENTS, ids=_ids(DOCUMENTS))
def test_nothing_contradicts_pyproject(document):
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    lower = {}
    for requirement in project["dependencies"] + sum(project["optional-dependencies"].values(), []):
        found = re.match(r"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?\s*([^;]*)", requirement)
        for bound in re.findall(r">=\s*([\w.]+)", found.group(2)):
            lower.setdefault(found.group(1).lower(), set()).add(bound)
    text = document.read_text()
    problems = []
    for name, version in re.findall(r"([A-Za-z][A-Za-z0-9_.-]*)\s*(?:>=|≥)\s*([0-9][\w.]*\d)", text):
        if name.lower() in lower and version not in lower[name.lower()]:
            problems.append(f"{name} >= {version} (pyproject.toml: >= {' or '.join(sorted(lower[name.lower()]))})")
    pythons = sorted(int(c.rsplit(".", 1)[1]) for c in project["classifiers"]
                     if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c))
    for low, high in re.findall(r"Python(?:s)?(?: from)? 3\.(\d+)\s*(?:–|-|to)\s*3\.(\d+)", text):
        if (int(low), int(high)) != (pythons[0], pythons[-1]):
            problems.append(f"Python 3.{low}-3.{high} (pyproject.toml: 3.{pythons[0]}-3.{pythons[-1]})")
    assert not problems, f"{document.name}: " + "; ".join(problems)
