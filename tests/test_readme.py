"""Every Python snippet of README.md runs as written, offline: the pretrained names it loads are
tiny random-weight models of the same kinds (conditioning, resolution, spec) put in a temporary
cache ($DIFFJAX_HOME), so the snippets exercise the real load / sample / upsample code paths."""
import pathlib
import re

import pytest

from tests._util import cache  # noqa: F401  (the fixture: tiny models under the pretrained names)

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_readme_snippet_runs(index, cache, monkeypatch, capsys):
    monkeypatch.setenv("DIFFJAX_HOME", str(cache))
    exec(compile(SNIPPETS[index], f"README.md snippet {index}", "exec"), {"__name__": "__readme__"})


def test_readme_has_snippets_and_no_shared_paths():
    assert len(SNIPPETS) >= 4
    assert "../shared" not in README.read_text()
