"""A freshly compiled converted model compiles once: tracing it must not change module-level state
that Dynamo guards on.

vit_fast.fusion kept a class -> split-paths cache that the first traced call filled; Dynamo
guarded on the cache's length, so the second call of every compiled converted model in a fresh
process failed that guard and traced the whole model again (torch 2.11 and 2.14). That recompile
also hid, on torch 2.11, that no guard watches a submodule's hooks (tests/test_convert_tools.py::
test_compiled_model_sees_hooks_added_later). Module-level caches are process state, so the check
runs in a fresh interpreter.
"""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = r"""
import torch, timm, vit_fast
torch.manual_seed(0)
model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8,
                          embed_dim=24, depth=2, num_heads=2, num_classes=5, init_values=0.1)
model = vit_fast.convert(model).eval()
graphs = []

def backend(gm, example_inputs):
    graphs.append(gm)
    return gm.forward

compiled = torch.compile(model, fullgraph=True, backend=backend)
x = torch.randn(3, 3, 16, 16)
with torch.no_grad():
    first = compiled(x)
    for _ in range(2):
        torch.testing.assert_close(compiled(x), first, rtol=0, atol=0)
print("graphs", len(graphs))
"""


def test_a_fresh_compiled_converted_model_compiles_once():
    env = dict(os.environ, TORCH_LOGS="recompiles")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-2:] == ["graphs", "1"], proc.stdout[-500:] + proc.stderr[-3000:]
