"""The documentation cannot drift: the Sphinx site builds with no warning, and every code block
marked runnable in README.md and docs/*.md executes (see docs/contributing.md).

A runnable block is a fenced block whose info string is ``python runnable``. The blocks of one page
run in order in one namespace, from the repository root (where the README says to run them); the
real tokenizers are ``nemo_xtoken.assets.tokenizer_path(name)``, as a user who ran ``make setup``
would write.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
RUNNABLE = "runnable"
_FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<info>.*)$")


@dataclass(frozen=True)
class Block:
    """One fenced code block of a Markdown page."""

    path: Path
    line: int  # 1-based line of the first code line
    info: str
    code: str

    @property
    def runnable(self) -> bool:
        words = self.info.split()
        return len(words) >= 2 and words[0] == "python" and RUNNABLE in words[1:]


def code_blocks(path: Path) -> list[Block]:
    """Every fenced code block of a Markdown file, in order (CommonMark fences, up to 3 spaces indent)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m or (m["fence"][0] == "`" and "`" in m["info"]):
            i += 1
            continue
        fence, indent, start = m["fence"], len(m["indent"]), i + 1
        body: list[str] = []
        i += 1
        while i < len(lines):
            close = _FENCE.match(lines[i])
            if close and close["fence"][0] == fence[0] and len(close["fence"]) >= len(fence) and not close["info"].strip():
                break
            body.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i])
            i += 1
        else:
            raise AssertionError(f"{path}:{start}: code fence {fence!r} is never closed")
        blocks.append(Block(path, start + 1, m["info"].strip(), "\n".join(body) + "\n"))
        i += 1
    return blocks


def run_blocks(blocks: list[Block], namespace: dict | None = None) -> dict:
    """Execute runnable blocks in order in one namespace; a failure names the page and its line.

    Each block is compiled with the page as file name and its Markdown line numbers, so a traceback
    points into the page.
    """
    ns = namespace if namespace is not None else {"__name__": "__docs__"}
    for b in blocks:
        if not b.runnable:
            continue
        try:
            code = compile("\n" * (b.line - 1) + b.code, str(b.path), "exec")
            with contextlib.redirect_stdout(io.StringIO()):
                exec(code, ns)  # noqa: S102 - the snippet is the test
        except Exception as e:
            raise AssertionError(f"{b.path}:{b.line}: runnable block failed: {type(e).__name__}: {e}") from e
    return ns


def doc_pages() -> list[Path]:
    """The pages whose runnable blocks are executed: README.md and docs/**/*.md."""
    return [ROOT / "README.md", *sorted(p for p in DOCS.rglob("*.md") if "_build" not in p.parts)]


@pytest.fixture
def snippet_dir(monkeypatch):
    """The repository root, where a user runs the snippets (README: "from the repository root").

    The default tokenizers are fetched first (``make setup`` does it); files a snippet writes into
    the root (``W.safetensors``, ``a.npz``) are removed afterwards, nothing else is touched.
    """
    from nemo_xtoken.assets import DEFAULT_TOKENIZERS, tokenizer_path

    for name in DEFAULT_TOKENIZERS:
        tokenizer_path(name)
    before = set(ROOT.iterdir())
    monkeypatch.chdir(ROOT)
    yield ROOT
    for p in set(ROOT.iterdir()) - before:
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


_PAGES_WITH_SNIPPETS = [p for p in doc_pages() if any(b.runnable for b in code_blocks(p))]


@pytest.mark.parametrize("page", _PAGES_WITH_SNIPPETS, ids=lambda p: str(p.relative_to(ROOT)))
def test_runnable_snippets(page: Path, snippet_dir: Path) -> None:
    """Every ``python runnable`` block of the page runs, in order, in one namespace."""
    run_blocks(code_blocks(page))


def test_readme_and_topic_pages_have_runnable_snippets() -> None:
    """The README's short Python tour and the topic pages' snippets (alignment, Python API: W, the
    audit, a loss) are marked, so they are executed."""
    runnable = {p.name: [b.line for b in code_blocks(p) if b.runnable] for p in doc_pages()}
    assert len(runnable["README.md"]) >= 1, runnable
    assert len(runnable["alignment.md"]) >= 1 and len(runnable["python-api.md"]) >= 2, runnable


_LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REF_LINK = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.M)
_INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)


def relative_links(path: Path) -> list[tuple[int, str]]:
    """(line, target) of every relative link or image of a Markdown page, outside code blocks and
    code spans; URLs (``scheme:``) and same-page anchors (``#…``) are left out."""
    lines = path.read_text(encoding="utf-8").splitlines()
    in_code: set[int] = set()
    for b in code_blocks(path):  # b.line is the first code line; the fences are the lines around
        in_code.update(range(b.line - 1, b.line + len(b.code.splitlines()) + 1))
    links = []
    for n, line in enumerate(lines, 1):
        if n in in_code:
            continue
        text = _INLINE_CODE.sub("", line)
        for target in [*_LINK.findall(text), *_REF_LINK.findall(text)]:
            if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith("#"):
                continue
            links.append((n, target))
    return links


def broken_links(path: Path) -> list[str]:
    """The relative links of a page whose file (the part before ``#``) does not exist."""
    broken = []
    for n, target in relative_links(path):
        file = target.split("#", 1)[0].split("?", 1)[0]
        if not (path.parent / file).exists():
            broken.append(f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:{n}: {target}")
    return broken


@pytest.mark.parametrize("page", doc_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_existing_files(page: Path) -> None:
    """Every relative link in README.md and docs/*.md points to a file of the repository (the
    anchor after ``#`` is not checked here; Sphinx checks the docs' anchors with -W)."""
    assert not broken_links(page), "links to missing files:\n" + "\n".join(broken_links(page))


def test_link_checker_finds_broken_links_and_skips_code(tmp_path: Path) -> None:
    (tmp_path / "there.md").write_text("# There\n", encoding="utf-8")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n"
        "[ok](there.md#a-heading), [web](https://example.com/x.md), [top](#page), ![img](missing.png)\n"
        "`[not a link](inline.md)` and [gone](gone.md \"title\")\n\n"
        "```markdown\n[in a block](block.md)\n```\n\n"
        "[ref]: refgone.md\n",
        encoding="utf-8",
    )
    assert [t for _, t in relative_links(page)] == ["there.md#a-heading", "missing.png", "gone.md", "refgone.md"]
    assert [b.rsplit(": ", 1)[1] for b in broken_links(page)] == ["missing.png", "gone.md", "refgone.md"]


def test_snippet_runner_reports_the_failing_line(tmp_path: Path) -> None:
    """A failing runnable block fails the test, naming the page and the Markdown line; unmarked
    blocks are not run; blocks of one page share a namespace."""
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n"
        "```python runnable\nx = 41\n```\n\n"
        "```python\nraise RuntimeError('not marked: never run')\n```\n\n"
        "````python runnable\ny = x + 1\ns = \"\"\"\n```\n\"\"\"\n````\n\n"
        "```python runnable\nassert y == 42\n\n1 / 0\n```\n",
        encoding="utf-8",
    )
    blocks = code_blocks(page)
    assert [b.runnable for b in blocks] == [True, False, True, True]
    assert blocks[2].code.splitlines() == ["y = x + 1", 's = """', "```", '"""']  # a shorter fence inside
    with pytest.raises(AssertionError, match=rf"page\.md:19: runnable block failed: ZeroDivisionError") as e:
        run_blocks(blocks)
    tb = e.value.__cause__.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    assert tb.tb_frame.f_code.co_filename == str(page) and tb.tb_lineno == 21


def test_unclosed_fence_is_an_error(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("```python runnable\nx = 1\n", encoding="utf-8")
    with pytest.raises(AssertionError, match="never closed"):
        code_blocks(page)


def _sphinx_build(src: Path, out: Path, *, fresh: bool = True) -> tuple[int, str]:
    """Build ``src`` into ``out``; ``fresh=False``: an incremental build of ``out`` (Sphinx re-reads the changed pages)."""
    from sphinx.cmd.build import build_main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = build_main(["-W", "--keep-going", "-q", *(["-E"] if fresh else []), "-b", "html", "-d", str(out / ".doctrees"), str(src), str(out)])
    return rc, err.getvalue()


def test_docs_site_builds_without_warnings(tmp_path: Path) -> None:
    """`make docs`'s very command, as a user runs it: a fresh interpreter from the repository root
    (none of this conftest's in-process import hooks, no PYTHONPATH), warnings are errors; every page
    and the API reference, ``integration.phi3_bridge`` (which imports Megatron-Bridge) included, are in."""
    pytest.importorskip("myst_parser", reason="the docs extra (sphinx, myst-parser) is installed by make setup")
    make = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert "-m sphinx -W --keep-going -b html docs docs/_build/html" in make  # the command below is make docs'
    api = DOCS / "api"
    had_api = api.exists()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    try:
        p = subprocess.run(
            [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html", "docs", str(tmp_path / "html")],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
        )
    finally:
        if not had_api:  # autosummary writes the API pages into the source tree
            shutil.rmtree(api, ignore_errors=True)
    assert p.returncode == 0, f"python -m sphinx -W failed (exit {p.returncode}):\n{p.stderr[-6000:]}"
    assert "phi3_bridge" in (tmp_path / "html" / "api" / "nemo_xtoken.integration.html").read_text(encoding="utf-8")
    phi3 = (tmp_path / "html" / "api" / "nemo_xtoken.integration.phi3_bridge.html").read_text(encoding="utf-8")
    assert "Phi3ModelProvider" in phi3 and "LongRoPE" in phi3
    index = (tmp_path / "html" / "index.html").read_text(encoding="utf-8")
    for page in sorted(DOCS.glob("*.md")):
        if page.stem != "index":
            assert f'href="{page.stem}.html"' in index, f"{page.name} is not in the index's toctree"
    losses = (tmp_path / "html" / "api" / "nemo_xtoken.losses.reference.html").read_text(encoding="utf-8")
    assert "p_kl" in losses and "KL(p_T" in losses  # a docstring made it into the reference


def test_docs_build_fails_on_a_warning_and_picks_up_new_pages(tmp_path: Path) -> None:
    """The glob toctree takes a new page without editing index.md (its sub-folder's Markdown is
    built, linkable, not listed), and a broken reference fails the build (-W): checked on a copy of
    the pages without the API reference (fast)."""
    pytest.importorskip("myst_parser", reason="the docs extra (sphinx, myst-parser) is installed by make setup")
    src = tmp_path / "src"
    shutil.copytree(DOCS, src, ignore=shutil.ignore_patterns("_build", "api"))
    (src / "api.md").write_text("# API reference\n", encoding="utf-8")  # no autodoc: seconds, not a minute
    (src / "zz_new_topic").mkdir()
    (src / "zz_new_topic" / "table.md").write_text("| a | b |\n|---|---|\n| 1 | 2 |\n", encoding="utf-8")  # an asset
    (src / "zz_new_topic.md").write_text(
        "# A new topic\n\nSee the [design](design.md) and [the table](zz_new_topic/table.md).\n", encoding="utf-8"
    )
    rc, err = _sphinx_build(src, tmp_path / "ok")
    assert rc == 0, err
    index = (tmp_path / "ok" / "index.html").read_text(encoding="utf-8")
    assert 'href="zz_new_topic.html"' in index and "table.html" not in index  # assets are not in the contents
    assert (tmp_path / "ok" / "zz_new_topic" / "table.html").is_file()
    (src / "zz_new_topic.md").write_text("# A new topic\n\nSee [nothing](no_such_page.md).\n", encoding="utf-8")
    rc, err = _sphinx_build(src, tmp_path / "ok", fresh=False)  # as `make docs` rebuilds after an edit: the changed page only
    assert rc != 0 and "no_such_page" in err, err


def test_makefile_builds_docs_with_warnings_as_errors() -> None:
    make = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert re.search(r"^docs:", make, re.M) and "-W --keep-going" in make
    assert os.path.exists(DOCS / "conf.py")


def _message_patterns(page: Path) -> list[str]:
    """The error messages a troubleshooting page lists: bold code spans at the start of a line."""
    patterns = []
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.startswith("**`"):
            patterns += [a or b for a, b in re.findall(r"\*\*`` (.+?) ``\*\*|\*\*`([^`]+)`\*\*", line)]
    return patterns


def _source_strings() -> str:
    """nemo_xtoken's source with adjacent string literals joined (a message split over lines reads whole)."""
    text = "\n".join(p.read_text(encoding="utf-8") for p in sorted((ROOT / "nemo_xtoken").rglob("*.py")))
    return re.sub(r"([\"'])\s*\n\s*(?:rf|fr|f|r)?\1", "", text)


def test_troubleshooting_messages_exist_in_the_code() -> None:
    """Every message on docs/troubleshooting.md is still raised by the code: each literal piece
    between the `…` placeholders occurs in nemo_xtoken's source."""
    patterns = _message_patterns(DOCS / "troubleshooting.md")
    assert len(patterns) >= 60, len(patterns)
    source = _source_strings()
    missing = []
    for pat in patterns:
        for piece in (p.strip() for p in pat.split("…")):
            if len(piece) >= 6 and piece not in source:
                missing.append(f"{piece!r} (from {pat!r})")
    assert not missing, "messages on docs/troubleshooting.md not found in nemo_xtoken:\n" + "\n".join(missing)
