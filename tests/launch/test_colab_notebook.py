"""experiments/colab/kimi_jax_tiny.ipynb: in step with its percent-format script, and it runs top to bottom
(nbclient, a few training steps) with the outputs it promises: a loss plot, a sample, an HF export that loads
back with the same logits."""

import pathlib
import re

import jupytext
import nbformat
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "experiments" / "colab" / "kimi_jax_tiny.ipynb"
SCRIPT = NOTEBOOK.with_suffix(".py")


def test_notebook_is_its_script():
    """Edit the .py and run `jupytext --sync experiments/colab/kimi_jax_tiny.py`: the two hold the same cells."""
    cells = lambda nb: [(c.cell_type, c.source.strip()) for c in nb.cells]
    assert cells(jupytext.read(SCRIPT)) == cells(nbformat.read(NOTEBOOK, as_version=4))
    assert all(not c.get("outputs") for c in nbformat.read(NOTEBOOK, as_version=4).cells)   # committed clean


@pytest.mark.slow
def test_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    from nbclient import NotebookClient
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for key, value in {"KIMI_JAX_NOTEBOOK_STEPS": "8", "KIMI_JAX_NOTEBOOK_WORKDIR": str(tmp_path / "run"),
                       "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", "KIMI_JAX_REPO_URL": ""}.items():
        monkeypatch.setenv(key, value)                   # the kernel inherits them; one CPU device
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    text = lambda cell: "".join(o.get("text", "") for o in cell.get("outputs", []) if o.output_type == "stream")
    outputs = [text(c) for c in nb.cells if c.cell_type == "code"]
    assert f"kimi-jax checkout: {ROOT}" in outputs[0]                 # found the checkout, installed nothing
    assert "tiny preset: " in outputs[1] and "parameters" in outputs[1]
    assert "step 8: loss " in outputs[2]
    plot = nb.cells[[i for i, c in enumerate(nb.cells) if "plt.show()" in c.source][0]]
    assert any("image/png" in o.get("data", {}) for o in plot.outputs)
    first, last = map(float, re.search(r"loss: (\S+) at step 1 -> (\S+) at step 8", outputs[3]).groups())
    assert last < first                                                # it learned something in 8 steps
    assert len(outputs[4].strip()) > len("def ")                        # prompt + sampled text
    assert "config.json" in outputs[5] and "model.safetensors" in outputs[5]
    difference = float(outputs[5].split("round trip: ")[1])
    assert difference < 1e-5
