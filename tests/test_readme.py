"""The README's example runs as written (so the README stays true)."""

import os
import re

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def test_readme_round_pieces_example_runs(capsys):
  text = open(README, encoding="utf-8").read()
  section = text.split("## A round's pieces, by hand", 1)[1]
  code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
  exec(compile(code, "README.md", "exec"), {})  # pylint: disable=exec-used
  out = capsys.readouterr().out
  assert "'loss'" in out and "rewards/accuracies" in out
