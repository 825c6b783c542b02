"""experiments/quickstart.ipynb: valid nbformat 4, and its code runs (CPU, few steps)."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

NOTEBOOK = os.path.join(REPO, "experiments", "quickstart.ipynb")

# Executes the notebook's code cells in order in one namespace, as a kernel would, minus
# shell and magic lines ('!', '%'), then prints what the test checks.
RUNNER = r"""
import json, sys
nb = json.load(open(sys.argv[1]))
ns = {"__name__": "__main__"}
for i, cell in enumerate(nb["cells"]):
    if cell["cell_type"] != "code":
        continue
    lines = "".join(cell["source"]).splitlines()
    code = "\n".join(l for l in lines if not l.lstrip().startswith(("!", "%")))
    exec(compile(code, f"<cell {i}>", "exec"), ns)
keep = {k: ns[k] for k in ("result", "events", "png", "clean", "STEPS")}
print("NOTEBOOK " + json.dumps(keep, default=str))
"""


def test_notebook_is_valid_nbformat_4():
    with open(NOTEBOOK) as f:
        nb = json.load(f)
    assert nb["nbformat"] == 4 and nb["nbformat_minor"] >= 5
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    ids = [c["id"] for c in nb["cells"]]
    assert len(set(ids)) == len(ids)
    for cell in nb["cells"]:
        assert cell["cell_type"] in ("markdown", "code")
        assert isinstance(cell["source"], list) and isinstance(cell["metadata"], dict)
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None
    first_code = next(c for c in nb["cells"] if c["cell_type"] == "code")
    assert "pip" in "".join(first_code["source"])  # installs jaxdml on Colab


def test_notebook_runs_a_faulty_run_to_full_accuracy_and_plots_it(tmp_path):
    env = {**os.environ, "JAXDML_QUICK": "1", "MPLBACKEND": "Agg", "TMPDIR": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, NOTEBOOK],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("NOTEBOOK "))
    out = json.loads(line[len("NOTEBOOK ") :])
    result, events = out["result"], out["events"]
    assert out["STEPS"] == 60 and result["steps"] == 60
    assert result["test_accuracy"] > 0.85
    assert result["test_accuracy"] == pytest.approx(out["clean"]["test_accuracy"], abs=0.01)
    assert result["faults"] == {"nan": 1, "device_loss": 2, "sdc": 1}
    assert result["num_devices"] == 1  # 4 -> 3 (lost) -> 2 (bit flip) -> 1 (lost)
    injected = [e["fault_kind"] for e in events if e["kind"] == "fault_injected"]
    assert injected == ["nan", "device_loss", "bitflip", "device_loss"]
    with open(out["png"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_notebook_installs_the_checkout_it_lies_in_without_a_placeholder():
    with open(NOTEBOOK) as f:
        nb = json.load(f)
    first_code = "".join(next(c for c in nb["cells"] if c["cell_type"] == "code")["source"])
    assert "YOUR-ORG" not in first_code and "JAXDML_SOURCE = None" in first_code
    ns: dict = {}
    exec(compile(first_code, "<install cell>", "exec"), ns)  # jaxdml importable: no pip
    assert ns["find_checkout"](os.path.join(REPO, "experiments")) == REPO
    assert ns["find_checkout"]("/") is None
