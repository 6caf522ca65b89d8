"""launch/colab_demo.ipynb: valid nbformat 4, and its code cells run on CPU without Jupyter.

The cells are run the way IPython would: a line `!command` (also indented, inside an `if`) becomes a
call that runs `command` in a shell after replacing `{NAME}` with the notebook variable NAME; all
other lines are Python, executed in one namespace. `!` lines that install packages (`pip install`)
or carry the marker `# skip-in-test` are not run; the test prints each skipped line.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

NOTEBOOK = REPO_ROOT / "launch" / "colab_demo.ipynb"
SKIP_MARK = "# skip-in-test"
_BANG = re.compile(r"^(\s*)!(.*)$")
_NAME = re.compile(r"\{(\w+)\}")


def _load() -> dict:
  return json.loads(NOTEBOOK.read_text(encoding="utf-8"))


def _source(cell: dict) -> str:
  source = cell["source"]
  return "".join(source) if isinstance(source, list) else source


def _code_cells() -> list[tuple[str, str]]:
  return [(cell.get("id", "?"), _source(cell)) for cell in _load()["cells"] if cell["cell_type"] == "code"]


def _shell_lines() -> list[str]:
  return [m.group(2) for _, src in _code_cells() for m in map(_BANG.match, src.splitlines()) if m]


def to_python(source: str) -> str:
  """The cell with each `!command` line replaced by `_shell("command")` at the same indentation."""
  lines = []
  for line in source.splitlines():
    match = _BANG.match(line)
    lines.append(f"{match.group(1)}_shell({match.group(2)!r})" if match else line)
  return "\n".join(lines) + "\n"


def is_skipped(command: str) -> bool:
  return "pip install" in command or SKIP_MARK in command


# ------------------------------------------------------------------------------------------------


def test_notebook_is_valid_nbformat4():
  nb = _load()
  assert nb["nbformat"] == 4 and nb["nbformat_minor"] >= 5
  assert nb["metadata"]["kernelspec"]["name"] == "python3"
  ids = [cell["id"] for cell in nb["cells"]]
  assert len(ids) == len(set(ids)) and all(re.fullmatch(r"[A-Za-z0-9_-]{1,64}", i) for i in ids)
  for cell in nb["cells"]:
    assert cell["cell_type"] in ("markdown", "code")
    assert isinstance(cell["metadata"], dict)
    assert isinstance(cell["source"], list) and all(isinstance(s, str) for s in cell["source"])
    if cell["cell_type"] == "code":
      assert cell["outputs"] == [] and cell["execution_count"] is None
    else:
      assert set(cell) == {"cell_type", "id", "metadata", "source"}
  assert nb["cells"][0]["cell_type"] == "markdown"


def test_cells_are_python_or_shell_lines_the_test_can_run():
  for cell_id, source in _code_cells():
    assert not re.search(r"^\s*%", source, re.M), f"cell {cell_id}: IPython magics cannot run in the test"
    compile(to_python(source), f"<cell {cell_id}>", "exec")
  for command in _shell_lines():
    # IPython would expand $NAME and {expression}; the notebook keeps to {NAME}.
    assert "$" not in command and not command.rstrip().endswith("\\"), command
    assert all(_NAME.fullmatch(m.group(0)) for m in re.finditer(r"\{[^}]*\}", command)), command


def test_notebook_walks_through_prepare_train_eval_and_search():
  commands = [c for c in _shell_lines() if not is_skipped(c)]
  modes = [re.search(r"--mode=(\w+)", c).group(1) for c in commands if "-m prvr_jax.main" in c]
  assert modes == ["prepare", "train", "eval"]
  (train,) = [c for c in commands if "--mode=train" in c]
  assert "--config.train.max_steps={STEPS}" in train
  assert all("--config={CONFIG} --workdir={WORKDIR}" in c for c in commands if "-m prvr_jax.main" in c)
  (search,) = [c for c in commands if "prvr_jax.search" in c]
  assert re.search(r"prvr_jax\.search query --index \S+ --clip \S+ .* --top-k \d+", search)
  installs = [c for c in _shell_lines() if is_skipped(c)]
  assert any("-r requirements.txt" in c for c in installs)
  assert any('"jax[tpu]==0.10.2"' in c for c in installs)
  settings = "".join(src for _, src in _code_cells())
  for variable in ("PRVR_DEMO_STEPS", "PRVR_DEMO_WORKDIR", "PRVR_DEMO_FLAGS", "PRVR_DEMO_RUNTIME"):
    assert variable in settings


@pytest.mark.slow
def test_notebook_runs_on_cpu(tmp_path, monkeypatch, capsys):
  workdir = tmp_path / "demo"
  monkeypatch.setenv("PRVR_DEMO_RUNTIME", "cpu")
  monkeypatch.setenv("PRVR_DEMO_WORKDIR", str(workdir))
  monkeypatch.setenv("PRVR_DEMO_STEPS", "2")
  monkeypatch.setenv("PRVR_DEMO_FLAGS", "--config.data.synthetic.num_train_videos=64 "
                     "--config.data.synthetic.num_val_videos=10 --config.data.synthetic.num_test_videos=10")
  monkeypatch.delenv("PRVR_DEMO_CLIP_DIR", raising=False)
  monkeypatch.delenv("PRVR_DEMO_INDEX", raising=False)
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
  namespace: dict = {"__name__": "__notebook__"}
  ran, skipped = [], []

  def shell(command: str) -> None:
    if is_skipped(command):
      print(f"[notebook test] skipped: !{command}")
      skipped.append(command)
      return
    expanded = _NAME.sub(lambda m: str(namespace[m.group(1)]), command)
    print(f"[notebook test] !{expanded}")
    result = subprocess.run(expanded, shell=True, executable="/bin/bash", env=env, cwd=os.getcwd(),
                            capture_output=True, text=True, timeout=900)
    print(result.stdout[-4000:], result.stderr[-4000:], sep="\n")
    assert result.returncode == 0, (f"!{expanded} exited with {result.returncode}:\n"
                                    f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    ran.append(expanded)

  namespace["_shell"] = shell
  old_cwd, old_path = os.getcwd(), list(sys.path)
  try:
    os.chdir(REPO_ROOT / "launch")  # the first cell finds the repository from here upwards
    for cell_id, source in _code_cells():
      exec(compile(to_python(source), f"<cell {cell_id}>", "exec"), namespace)  # pylint: disable=exec-used
  finally:
    os.chdir(old_cwd)
    sys.path[:] = old_path
  printed = capsys.readouterr().out

  assert namespace["REPO_DIR"] == REPO_ROOT and namespace["RUNTIME"] == "cpu"
  # Only the requirements install is skipped; the TPU wheel line does not even run on CPU.
  assert skipped and all("pip install" in c for c in skipped)
  assert not any("jax[tpu]" in c for c in skipped + ran)
  assert [m for c in ran for m in re.findall(r"--mode=(\w+)", c)] == ["prepare", "train", "eval"]
  assert namespace["PLOTS"], f"no PNG plots were written under {workdir}"
  if not namespace["HAVE_SEARCH"]:
    assert "SKIPPED search: prvr_jax.search is not part of this version" in printed
