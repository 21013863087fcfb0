"""One source of truth: the README's interface tables and the generated configs follow the table."""
import json
import re
from pathlib import Path

import pytest

from audiostory_ensemble import interface as I
from export import make_repo as M

ROOT = Path(__file__).resolve().parent.parent


def test_readme_interface_tables_match_the_module():
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- interface:begin -->\n(.*?)\n<!-- interface:end -->", text, re.S).group(1)
    assert block == I.markdown_tables(), "README is stale: paste `python -m audiostory_ensemble.interface`"


def test_generated_repository_fills_every_field_and_names(exported, tmp_path):
    repo = M.make_repo("cpu", "tiny", tmp_path / "repo")
    for name in M.PIPELINE:
        config = (repo / name / "config.pbtxt").read_text()
        assert "${" not in config, name
        assert f'name: "{name}"' in config
    ensemble = (repo / "audiostory" / "config.pbtxt").read_text()
    for t in I.REQUEST_INPUTS + I.CLIP_OUTPUTS:
        assert f'"{t.name}"' in ensemble
    assert "TYPE_BYTES" not in ensemble and "TYPE_STRING" in ensemble
    llm = (repo / "llm" / "config.pbtxt").read_text()
    options = re.search(r'key: "engine_options" value: \{ string_value: (".*?[^\\]") \}', llm).group(1)
    assert json.loads(json.loads(options))["dtype"] == "float32"
    assert (repo / "dit_step" / "1" / "model.py").read_text() == (repo / "vae_decoder" / "1" / "model.py").read_text()


def test_generator_refuses_unknown_settings_and_missing_engines(exported, tmp_path):
    bad = tmp_path / "s.json"
    bad.write_text(json.dumps({"dit_max_batchh": 8}))
    with pytest.raises(SystemExit, match="unknown setting"):
        M.make_repo("cpu", "tiny", tmp_path / "repo", bad)
    with pytest.raises(SystemExit, match="no TensorRT engine for dit_step"):
        M.make_repo("gpu", "tiny", tmp_path / "repo2")


def test_template_with_a_missing_field_is_named():
    with pytest.raises(SystemExit, match="x.pbtxt: no value for dims_here"):
        M.render("dims: ${dims_here}", {}, "x.pbtxt")
