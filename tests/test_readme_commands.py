"""The README's promises that a reader acts on first: its two commands exist and CI runs exactly
the test command; its status table stays short and names result files that exist."""
from __future__ import annotations

import glob
import itertools
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def section(title: str) -> str:
  """The text of the README's '## title' section, up to the next '## ' heading."""
  match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", README, re.M | re.S)
  assert match, f"README has no '## {title}' section"
  return match[1]


def shell_lines(text: str) -> list[str]:
  """Commands of a shell script: no comments, blank lines, `set` or `cd`."""
  lines = [line.split(" #")[0].strip() for line in text.splitlines()]
  return [line for line in lines if line and not line.startswith(("#", "set ", "cd "))]


def test_the_two_commands():
  blocks = re.findall(r"```bash\n(.*?)```", section("Two commands"), re.S)
  assert [shell_lines(b) for b in blocks] == [["bash run/bench.sh"], ["bash run/test.sh"]]
  for script in ("run/bench.sh", "run/test.sh", "run/setup_env.sh"):
    assert (ROOT / script).is_file(), script


def test_ci_runs_exactly_the_test_command():
  assert shell_lines((ROOT / ".ci" / "run").read_text()) == ["bash run/test.sh"]


def expand(pattern: str) -> list[str]:
  """'a{b,c}d*' -> the files under benchmarks/results/ it names (braces, then a glob)."""
  parts = re.split(r"\{([^}]*)\}", pattern)
  choices = [[p] if i % 2 == 0 else p.split(",") for i, p in enumerate(parts)]
  names = ["".join(c) for c in itertools.product(*choices)]
  return [hit for name in names for hit in glob.glob(str(ROOT / "benchmarks" / "results" / name))]


def test_status_table_is_short_and_its_result_files_exist():
  rows = [line for line in section("Status").splitlines()
          if line.startswith("|") and not line.startswith("|---")][1:]   # after the header
  assert 1 <= len(rows) <= 15, len(rows)
  for row in rows:
    files = re.findall(r"`([^`]+\.json)`", row.split("|")[-2])
    assert files, row
    for pattern in files:
      want = 1 if not re.search(r"[{*]", pattern) else 2
      assert len(expand(pattern)) >= want, f"README status names a missing result file: {pattern}"


def test_documents_speak_of_the_project_not_of_the_work():
  """Dates, not numbered work periods or issue numbers, in the two documents users read."""
  for doc in ("README.md", "BENCHMARKS.md"):
    text = (ROOT / doc).read_text()
    for bad in (r"\bsession\b", r"\bissue[- ]?\d", r"\bissues \d"):
      hits = re.findall(rf".{{0,40}}{bad}.{{0,40}}", text, re.I)
      assert not hits, (doc, hits[:3])
