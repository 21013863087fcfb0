"""The package's layers depend one way, and the client side needs no torch.

``runtime`` (process and asyncio helpers) and ``pipeline`` (the data path) sit under ``llm`` and
``serving``; ``llm`` never imports ``serving``; the client, the web page and the data path's
request checks, records, story and stitching import without torch, vLLM or Triton's stub module
(the client library is installed where none of them is)."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "audiostory_ensemble"

# layer -> the sibling layers it may not import
FORBIDDEN = {"runtime": {"pipeline", "llm", "serving", "model"},
             "pipeline": {"llm", "serving"},
             "llm": {"serving"},
             "model": {"pipeline", "llm", "serving", "runtime"}}


def imported_layers(path: Path) -> set[str]:
    """The ``audiostory_ensemble`` sub-packages a module imports (absolute or relative, at any depth)."""
    module = path.relative_to(ROOT).with_suffix("").parts
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = module[:len(module) - node.level]
                parts = [*base, *(node.module.split(".") if node.module else [])]
                names = [[*parts, a.name] for a in node.names] if not node.module else [parts]
            else:
                names = [node.module.split(".")] if node.module else []
        elif isinstance(node, ast.Import):
            names = [a.name.split(".") for a in node.names]
        else:
            continue
        for parts in names:
            if len(parts) > 1 and parts[0] == "audiostory_ensemble":
                out.add(parts[1])
    return out


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_each_layer_imports_only_the_layers_under_it(layer):
    bad = {str(p.relative_to(ROOT)): sorted(imported_layers(p) & FORBIDDEN[layer])
           for p in sorted((PACKAGE / layer).glob("*.py"))}
    assert not {k: v for k, v in bad.items() if v}, bad


def test_the_layer_check_sees_relative_and_absolute_imports(tmp_path):
    llm = PACKAGE / "llm"
    fake = llm / "_layer_probe.py"
    try:
        for text in ("from ..serving import control\n", "from ..serving.control import BUSY\n",
                     "import audiostory_ensemble.serving.control\n", "def f():\n    from .. import serving\n"):
            fake.write_text(text)
            assert "serving" in imported_layers(fake), text
    finally:
        fake.unlink(missing_ok=True)


CLIENT_SIDE = ["client", "client.api", "client.__main__", "client.subtitles", "client.dub", "web.app",
               "audiostory_ensemble.interface", "audiostory_ensemble.names", "audiostory_ensemble.serving.control",
               "audiostory_ensemble.pipeline.request", "audiostory_ensemble.pipeline.records",
               "audiostory_ensemble.pipeline.script", "audiostory_ensemble.pipeline.story",
               "audiostory_ensemble.pipeline.stitch", "audiostory_ensemble.model.post"]
BLOCKER = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED}:
            raise ImportError(f"{name} is blocked: the client side must not need it")
sys.meta_path.insert(0, Block())
import importlib
for m in {MODULES}:
    importlib.import_module(m)
print("imported", len({MODULES}))
"""


def client_side_imports(modules, blocked=("torch", "vllm", "transformers", "triton_python_backend_utils")):
    code = BLOCKER.replace("{BLOCKED}", repr(set(blocked))).replace("{MODULES}", repr(modules))
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_the_client_the_web_page_and_the_data_path_import_without_torch_vllm_or_triton():
    result = client_side_imports(CLIENT_SIDE)
    assert result.returncode == 0, result.stderr[-2000:]
    # The blocker works: a module that needs torch fails under it.
    assert client_side_imports(["audiostory_ensemble.model.sampler"]).returncode != 0
