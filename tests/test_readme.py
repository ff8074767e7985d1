"""Every Python snippet of README.md runs as written, offline: the pretrained names it loads are
tiny random-weight models of the same kinds (conditioning, resolution, spec) put in a temporary
cache ($DIFFJAX_HOME), so the snippets exercise the real load / sample / upsample code paths."""
import pathlib
import re

import pytest

from tests._util import cache  # noqa: F401  (the fixture: tiny models under the pretrained names)

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
# The snippets that upsample to 256 px run under -m slow (~90 s each on 2 cores, even with tiny
# networks: 25 steps of 256 x 256 convolutions after the base model's loop).
PARAMS = [pytest.param(i, marks=pytest.mark.slow) if "upsampler" in snippet else i
          for i, snippet in enumerate(SNIPPETS)]


@pytest.mark.parametrize("index", PARAMS)
def test_readme_snippet_runs(index, cache, monkeypatch, capsys):
    monkeypatch.setenv("DIFFJAX_HOME", str(cache))
    exec(compile(SNIPPETS[index], f"README.md snippet {index}", "exec"), {"__name__": "__readme__"})


def test_readme_has_snippets_and_no_shared_paths():
    assert len(SNIPPETS) >= 4
    assert "../shared" not in README.read_text()
