"""The README's two commands are the ones CI and users run."""

from __future__ import annotations

import re

from tests.conftest import REPO_ROOT


def _bash_blocks(text: str) -> list[str]:
  return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def test_ci_runs_the_readme_test_command():
  readme = (REPO_ROOT / "README.md").read_text()
  blocks = _bash_blocks(readme)
  test_cmd = next(b for b in blocks if "pytest" in b).strip().split("&& ")[-1]
  ci = (REPO_ROOT / ".ci" / "run").read_text()
  assert test_cmd in ci.splitlines()
  assert "requirements-test.txt" in ci


def test_readme_demo_trains_the_default_config():
  readme = (REPO_ROOT / "README.md").read_text()
  demo = _bash_blocks(readme)[0].strip()
  assert demo.endswith("python -m prvr_jax.main")
  main = (REPO_ROOT / "prvr_jax" / "main.py").read_text()
  assert '"synthetic.py"' in main and '"mode", "train"' in main
  assert "PLACEHOLDER" not in readme
