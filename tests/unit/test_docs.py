"""The user docs stay true to the code: every recipe field is documented, every `moe` example uses flags the
command has, the README stays a guide (<= 300 lines) and its links resolve."""

import dataclasses
import re

import pytest
import typer

from support.paths import ROOT
from moecli.cli.app import app
from moecli.config import SECTIONS

DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [ROOT / "README.md", *DOCS]


def test_every_recipe_field_is_documented():
    text = (ROOT / "docs" / "recipes.md").read_text()
    for section, cls in SECTIONS.items():
        part = text.split(f"### `{section}`", 1)[1].split("###", 1)[0]
        for f in dataclasses.fields(cls):
            assert f"| `{f.name}` |" in part, f"docs/recipes.md: {section}.{f.name} is not documented"


def _examples():
    for page in PAGES:
        for block in re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S):
            for line in block.splitlines():
                for cmd in re.findall(r"(?:^|[|&;]\s*)moe ([a-z-]+)([^|;&#]*)", line):
                    yield page.name, line, cmd


@pytest.mark.parametrize("page", [p.name for p in PAGES])
def test_examples_use_real_commands_and_flags(page):
    commands = {c.name: c for c in typer.main.get_command(app).commands.values()}
    seen = 0
    for name, line, (sub, rest) in _examples():
        if name != page:
            continue
        seen += 1
        assert sub in commands, f"{page}: `moe {sub}` is not a command: {line}"
        flags = {o for p in commands[sub].params for o in p.opts + p.secondary_opts}
        for flag in re.findall(r"(?<![\w-])(--?[a-zA-Z][\w-]*)", rest):
            assert flag in flags, f"{page}: `moe {sub}` has no {flag}: {line}"
    assert seen or page not in ("README.md", "training.md", "upcycling.md", "routing.md")


def test_readme_is_a_guide_and_its_links_resolve():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    assert len(DOCS) >= 4
    for page in [*PAGES, ROOT / "benchmarks" / "README.md"]:
        for target in re.findall(r"\]\(([^)#]+)\)", page.read_text()):
            if "://" not in target:
                assert (page.parent / target).exists(), f"{page.name}: broken link {target}"


def test_every_package_is_installed():
    """pyproject's packages list every directory of moecli with an __init__.py (a non-editable install holds only
    those: moecli.families once went missing, and every Hugging Face checkpoint with it)."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "moecli").rglob("__init__.py")}
    assert found <= listed, f"pyproject.toml [tool.setuptools] packages misses {sorted(found - listed)}"
