"""The documentation's examples run: every `python` and `bash` block of README.md, CONTRIBUTING.md, exports/README.md
and docs/ is executed (Sybil's Markdown parsers), in a fresh folder, offline, unless an HTML comment before it says
why it cannot run here:

    <!-- skip: next "downloads official checkpoints" -->

A skipped block is still checked to parse (Python by `compile`, shell by `bash -n`). Python blocks of a page share
one namespace, in order; a shell block runs line by line, a `bit-keras ...` line through `bit_keras.cli.main` in this
process (the console script's entry point, without starting TensorFlow again), any other line through bash. Fenced
blocks name their language: `python` and `bash` are tested, `text` and `bibtex` are not code."""

import contextlib
import importlib.util
import io
import pathlib
import re
import shlex
import subprocess
from unittest import SkipTest

import pytest
from sybil import Sybil
from sybil.parsers.markdown import CodeBlockParser, PythonCodeBlockParser, SkipParser

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = [
    ROOT / "README.md",
    ROOT / "CONTRIBUTING.md",
    ROOT / "exports" / "README.md",
    *sorted((ROOT / "docs").rglob("*.md")),
]
LANGUAGES = {"python", "bash", "text", "bibtex"}  # every fenced block names one of these
FENCE = re.compile(r"^```(\S*)[^\n]*\n(.*?)^```$", re.MULTILINE | re.DOTALL)
OPERATORS = set("();<>|&")


def _commands(source: str) -> list[str]:
    """The block's command lines, continuations joined, blank and comment-only lines dropped."""
    joined = re.sub(r"\\\n", " ", source)
    return [line for line in joined.splitlines() if shlex.split(line, comments=True)]


def run_shell(example) -> None:
    for command in _commands(str(example.parsed)):
        lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
        lexer.commenters = "#"
        tokens = list(lexer)
        plain = not any(set(token) <= OPERATORS for token in tokens) and "=" not in tokens[0]
        if plain and tokens[0] == "bit-keras":
            from bit_keras import cli

            out = io.StringIO()
            try:
                with contextlib.redirect_stdout(out):
                    status = cli.main(tokens[1:])
            except SystemExit as exit_:  # argparse's errors
                status = exit_.code
            print(out.getvalue())
        else:
            status = subprocess.run(["bash", "-c", command], check=False).returncode
        assert status == 0, f"`{command}` exited with status {status}"


SYBIL = Sybil(parsers=[PythonCodeBlockParser(), CodeBlockParser(language="bash", evaluator=run_shell), SkipParser()])


def run_page(path: pathlib.Path) -> tuple[int, list[str]]:
    """Evaluate the page's blocks in order: (how many ran, the reasons of those skipped). A failing block is an
    AssertionError naming its file and line."""
    ran, skipped = 0, []
    for example in SYBIL.parse(path):
        code = not isinstance(example.parsed, tuple)  # a skip directive's is (action, reason)
        try:
            example.evaluate()
        except SkipTest as skip:
            skipped.append(str(skip))
            continue
        except Exception as err:
            raise AssertionError(f"{path}:{example.line}: {type(err).__name__}: {err}") from err
        ran += code
    return ran, skipped


def check_blocks(path: pathlib.Path) -> int:
    """Every fenced block names a known language, and every `python` and `bash` block parses; the number checked."""
    checked = 0
    for match in FENCE.finditer(path.read_text(encoding="utf-8")):
        language, source = match.groups()
        line = path.read_text(encoding="utf-8")[: match.start()].count("\n") + 1
        assert language in LANGUAGES, f"{path}:{line}: a fenced block in {language or 'no language'!r}"
        if language == "python":
            compile(source, f"{path}:{line}", "exec")
        elif language == "bash":
            result = subprocess.run(["bash", "-n"], input=source, text=True, capture_output=True, check=False)
            assert result.returncode == 0, f"{path}:{line}: {result.stderr.strip()}"
        checked += language in ("python", "bash")
    return checked


@pytest.fixture
def fresh_folder(tmp_path, monkeypatch):
    """The examples write `runs/` and `exports/` where they run: in a folder of their own."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BIT_KERAS_CACHE", str(tmp_path / "cache"))
    return tmp_path


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_page_examples_run(page, fresh_folder):
    blocks = check_blocks(page)
    ran, skipped = run_page(page)
    assert ran + len(skipped) == blocks, f"{page}: {blocks} blocks, {ran} ran, {len(skipped)} skipped"


def test_every_page_is_tested():
    assert (ROOT / "docs" / "index.md").exists()
    assert sum(check_blocks(page) for page in PAGES) > 20
    ran_somewhere = [p for p in PAGES if re.search(r"^```(python|bash)\n", p.read_text(), re.M)]
    assert ROOT / "README.md" in ran_somewhere


def test_planted_broken_blocks_fail(fresh_folder):
    page = fresh_folder / "page.md"

    def planted(body):
        page.write_text("# A page\n\n" + body)
        return page

    good = planted('```python\nx = 1\n```\n\n<!-- skip: next "needs a network" -->\n```python\nx = 2\n```\n')
    assert run_page(good) == (1, ["needs a network"])
    assert check_blocks(good) == 2
    with pytest.raises(AssertionError, match=r"page.md:3: ZeroDivisionError"):
        run_page(planted("```python\n1 / 0\n```\n"))
    with pytest.raises(AssertionError, match="no-such-flag"):
        run_page(planted("```bash\nbit-keras models --no-such-flag\n```\n"))
    with pytest.raises(AssertionError, match="exited with status 1"):
        run_page(planted("```bash\ntrue && false\n```\n"))
    with pytest.raises(SyntaxError):  # a skipped block still has to parse
        check_blocks(planted('<!-- skip: next "offline" -->\n```python\ndef broken(:\n```\n'))
    with pytest.raises(AssertionError, match="syntax error"):
        check_blocks(planted('<!-- skip: next "offline" -->\n```bash\nif then fi (\n```\n'))
    with pytest.raises(AssertionError, match="'sh'"):  # an untested language is refused, not ignored
        check_blocks(planted("```sh\nbit-keras models\n```\n"))


def test_pages_name_no_issue_numbers():
    for page in [*PAGES, ROOT / "benchmarks" / "RESULTS.md", ROOT / "benchmarks" / "README.md"]:
        text = page.read_text(encoding="utf-8")
        assert not re.search(r"issue #?\d+|\bsessions? (so far|of this)", text, re.IGNORECASE), page
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200


def test_generated_parts_render():
    """What docs/hooks.py generates at build time, rendered from the code (the site build checks the rest)."""
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    from bit_keras.models import presets

    cli = hooks.GENERATORS["cli"]()
    for command in ("finetune", "pretrain", "finetune-detector", "export", "predict", "detect", "models", "convert"):
        assert f"## bit-keras {command}\n" in cli
    zoo = hooks.GENERATORS["zoo"]()
    assert all(f"`{name}`" in zoo for name in presets.PRESETS)
    assert "bit_m_r50x1_ilsvrc2012" in hooks.GENERATORS["presets"]()
    linked = hooks._site_links("[a](docs/guides/export.md#x) [b](CONTRIBUTING.md) [c](https://x/y.md)", "index.md")
    assert linked == "[a](guides/export.md#x) [b](contributing.md) [c](https://x/y.md)"
