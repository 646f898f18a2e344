"""The notebooks under notebooks/: each runs top to bottom in a fresh Jupyter kernel against the tiny demo model.

The `parameters`-tagged cell of each notebook is followed by an injected cell (as papermill does) that points
MODEL at a demo checkpoint built by `jaxvlm.demo.make_demo_model`, draws the image locally (IMAGE = None) and
keeps answers short. After the last cell, a probe cell prints the notebook's key results as JSON, so that the
test checks values rather than scraping text. The kernels run on CPU with no network, like CI.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import nbclient  # nbclient, nbformat and ipykernel come with the `test` extra
import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
EXPECTED = ("01_quickstart.ipynb", "02_convert_to_orbax.ipynb", "03_tensor_parallel.ipynb")
CELL_TIMEOUT_S = 300
NEW_TOKENS = 6
PROBE_MARK = "NOTEBOOK-PROBE "


# ------------------------------------------------------------------------------------------------ helpers


def read(name: str):
    return nbformat.read(NOTEBOOKS / name, as_version=4)


def parameters_index(nb) -> int:
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"expected exactly one cell tagged 'parameters', found {len(tagged)}"
    return tagged[0]


def run_notebook(name: str, parameters: dict, probe: str, workdir: Path) -> tuple[object, dict]:
    """Executes a copy of the notebook with `parameters` injected after its parameters cell and `probe` (code
    that builds a dict named `probe`) appended; returns the executed notebook and that dict."""
    nb = read(name)
    at = parameters_index(nb)
    source = "# Parameters injected by tests/test_notebooks.py\n" + "".join(
        f"{key} = {value!r}\n" for key, value in parameters.items())
    injected = nbformat.v4.new_code_cell(source, id="injected-parameters")
    injected.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(at + 1, injected)
    nb.cells.append(nbformat.v4.new_code_cell(
        f"import json\n{probe}\nprint({PROBE_MARK!r} + json.dumps(probe))", id="test-probe"))
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(workdir)}})
    client.execute()  # raises CellExecutionError, with the cell and its traceback, if any cell fails
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    printed = [line for line in stdout_of(nb.cells[-1]).splitlines() if line.startswith(PROBE_MARK)]
    assert len(printed) == 1, stdout_of(nb.cells[-1])
    return nb, json.loads(printed[0][len(PROBE_MARK):])


def cell(nb, cell_id: str):
    return next(c for c in nb.cells if c.get("id") == cell_id)


def stdout_of(code_cell) -> str:
    return "".join(o.text for o in code_cell.outputs if o.output_type == "stream" and o.name == "stdout")


def html_of(code_cell) -> list[str]:
    return [o.data["text/html"] for o in code_cell.outputs
            if o.output_type in ("display_data", "execute_result") and "text/html" in o.data]


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory) -> Path:
    from jaxvlm.demo import make_demo_model

    return make_demo_model(tmp_path_factory.mktemp("notebooks") / "demo-model")


@pytest.fixture(autouse=True)
def kernel_env(monkeypatch):
    """Kernels inherit this process's environment: CPU only, no hub, this checkout importable. The
    compilation cache (JAXVLM_CACHE_DIR, set by conftest.py) is shared, so notebooks reuse compiled programs."""
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))


# ------------------------------------------------------------------------------------------------ the files


def test_notebooks_in_git_have_cleared_outputs():
    found = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))
    assert set(EXPECTED) <= set(found), found
    for name in found:
        nb = read(name)
        nbformat.validate(nb)
        for c in nb.cells:
            if c.cell_type == "code":
                assert c.outputs == [], f"{name}: cell {c.get('id')} has outputs"
                assert c.execution_count is None, f"{name}: cell {c.get('id')} has an execution count"
                assert "execution" not in c.metadata, f"{name}: cell {c.get('id')} keeps execution timings"
        assert "widgets" not in nb.metadata, f"{name}: widget state saved in the metadata"
        # Colab's default: the notebook opens on a hub model, overridable through the parameters cell.
        params = nb.cells[parameters_index(nb)].source
        assert 'MODEL = "llava-hf/llava-1.5-7b-hf"' in params, f"{name}: {params}"


def test_install_cell_is_guarded():
    """On a runtime that has jaxvlm (CI), the install cell must do nothing; no IPython magics anywhere (they
    would fail under plain Python and hide what runs)."""
    for name in EXPECTED:
        nb = read(name)
        install = cell(nb, "install")
        assert 'importlib.util.find_spec("jaxvlm") is None' in install.source
        for c in nb.cells:
            if c.cell_type == "code":
                magics = [line for line in c.source.splitlines() if line.lstrip().startswith(("!", "%"))]
                assert not magics, f"{name}: {magics}"


# ------------------------------------------------------------------------------------------------ running them


def test_quickstart(demo_model, tmp_path):
    nb, probe = run_notebook(
        "01_quickstart.ipynb", {"MODEL": str(demo_model), "IMAGE": None, "MAX_NEW_TOKENS": NEW_TOKENS}, """
probe = {
    "describe": [response.finish_reason, response.generate_token_len, bool(response.text)],
    "batch": [[r.finish_reason, r.index, r.input_token_len] for r in responses],
    "same_seed": first.text == again.text, "sampled_tokens": first.generate_token_len,
    "streamed": streamed, "greedy_text": response.text,
    "image_size": list(image.size),
}""", tmp_path)
    assert "jaxvlm is already installed" in stdout_of(cell(nb, "install"))
    assert probe["image_size"] == [336, 336]  # IMAGE = None: the picture drawn in the notebook
    # The describe cell shows the picture next to the answer, in HTML (no plotting library), and the Response.
    html = html_of(cell(nb, "describe"))
    assert len(html) == 1 and html[0].count("<img src=\"data:image/png;base64,") == 1
    assert "finish_reason=" in stdout_of(cell(nb, "describe"))
    assert probe["describe"][0] in ("stop", "length") and 0 < probe["describe"][1] <= NEW_TOKENS
    assert len(html_of(cell(nb, "messages"))) == 1  # OpenAI messages with the picture as a data: URL
    # The batch: three answers in input order; the two-image prompt is longer than the one-image prompt.
    batch = probe["batch"]
    assert [b[1] for b in batch] == [0, 1, 2] and all(b[0] in ("stop", "length") for b in batch)
    assert batch[1][2] > batch[0][2]
    assert [h.count("<img ") for h in html_of(cell(nb, "batch"))] == [1, 2, 0]
    assert probe["same_seed"] is True and probe["sampled_tokens"] > 0
    assert "same seed, same answer: True" in stdout_of(cell(nb, "sampling"))
    # Streaming yields the greedy answer, piece by piece.
    assert probe["streamed"] == probe["greedy_text"]
    assert "the same text as the greedy answer above: True" in stdout_of(cell(nb, "stream"))


def test_convert_to_orbax(demo_model, tmp_path):
    dst = tmp_path / "demo-jaxvlm"
    nb, probe = run_notebook(
        "02_convert_to_orbax.ipynb",
        {"MODEL": str(demo_model), "DST": str(dst), "IMAGE": None, "MAX_NEW_TOKENS": NEW_TOKENS}, """
probe = {
    "dst": str(dst), "marker_dtype": marker["dtype"],
    "source": [a.token_ids for a in source_answers], "converted": [b.token_ids for b in converted_answers],
}""", tmp_path)
    assert probe["dst"] == str(dst) and (dst / "jaxvlm_checkpoint.json").is_file()
    assert probe["marker_dtype"] == "float32"  # DTYPE = None keeps the demo model's own dtype
    assert "weights/" in stdout_of(cell(nb, "listing"))
    assert len(probe["source"]) == 2 and all(len(t) > 0 for t in probe["source"])
    assert probe["converted"] == probe["source"]
    assert "token for token" in stdout_of(cell(nb, "check"))


def test_tensor_parallel(demo_model, tmp_path):
    nb, probe = run_notebook(
        "03_tensor_parallel.ipynb", {"MODEL": str(demo_model), "IMAGE": None, "MAX_NEW_TOKENS": NEW_TOKENS}, """
probe = {
    "xla_flags": os.environ.get("XLA_FLAGS", ""), "devices": len(devices), "tp": TP,
    "qkv_proj_spec": [None if a is None else str(a) for a in qkv_proj_spec],
    "tp_tokens": tp_tokens, "tp1_tokens": tp1_tokens,
}""", tmp_path)
    # No accelerator (JAX_PLATFORMS=cpu): the first cell split the CPU into 2 devices before JAX started.
    assert "--xla_force_host_platform_device_count=2" in probe["xla_flags"]
    assert probe["devices"] == 2 and probe["tp"] == 2
    assert probe["qkv_proj_spec"] == [None, "model", None, None]  # [hidden, kv_heads, q/k/v, head_dim]: heads split
    q_line = next(line for line in stdout_of(cell(nb, "sharding")).splitlines() if "self_attn.qkv_proj:" in line)
    assert "'model'" in q_line and "shard (64, 2, 3, 16) on each of 2 devices" in q_line, q_line
    assert all(len(t) == NEW_TOKENS for t in probe["tp_tokens"])  # ignore_eos: full length
    assert probe["tp_tokens"] == probe["tp1_tokens"]
    assert stdout_of(cell(nb, "tp-1")).count("tokens identical") == 2
