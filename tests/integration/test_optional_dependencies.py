"""A missing optional library disables one feature, never the pack: every node still registers.

ComfyUI loads a pack by running its ``comfy_entrypoint``; an ImportError there loses every node. The
optional libraries (reward models, Pick-a-Pic parquet, the headless trainer) must therefore be
imported inside the functions that use them.
"""

from __future__ import annotations

import json
import subprocess
import sys

from extension_loader import REPO_ROOT, node_classes

# transformers is not in the list: the host itself needs it (its CLIP tokenizers).
OPTIONAL = ("open_clip", "diffusers", "peft", "accelerate", "pyarrow", "pandas", "tensorboard", "timm",
            "sklearn", "playwright")

_CODE = """
import json, sys
blocked = set(json.loads(sys.argv[1]))
for name in blocked:  # None in sys.modules: `import name` fails, importlib.util.find_spec says absent
    sys.modules[name] = None
sys.path[:0] = json.loads(sys.argv[2])
import comfy.cli_args
comfy.cli_args.args.cpu = True
import extension_loader
ids = sorted(cls.define_schema().node_id for cls in extension_loader.node_classes())
loaded = sorted(n for n in blocked if sys.modules.get(n) is not None)
print(json.dumps({"ids": ids, "loaded": loaded}))
"""


def test_every_node_registers_without_the_optional_libraries(comfy_inprocess):
    from tools.comfy_host import host_sys_path

    expected = sorted(cls.define_schema().node_id for cls in node_classes())
    paths = [*host_sys_path(), str(REPO_ROOT / "tests"), str(REPO_ROOT)]
    proc = subprocess.run([sys.executable, "-c", _CODE, json.dumps(OPTIONAL), json.dumps(paths)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["loaded"] == []
    assert result["ids"] == expected and len(expected) >= 11
