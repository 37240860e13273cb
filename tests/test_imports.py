"""`bevfusion.ops` and `bevfusion.models` import with torch (and triton) alone, as on the GPU machine."""
from __future__ import annotations

import subprocess
import sys

BLOCKED = ("numba", "scipy", "nuscenes", "rerun", "spconv", "shapely", "llvmlite", "PIL")
MODULES = ("bevfusion.ops.bev_pool", "bevfusion.ops.voxelize", "bevfusion.ops.boxes", "bevfusion.ops.sparse",
           "bevfusion.models", "bevfusion.models.bevfusion", "bevfusion.models.camera.vtransforms",
           "bevfusion.models.camera.backbones.swin", "bevfusion.models.camera.backbones.resnet",
           "bevfusion.models.lidar.sparse_encoder", "bevfusion.models.heads.transfusion",
           "bevfusion.models.heads.centerpoint", "bevfusion.models.heads.segm", "bevfusion.models.fusers",
           "bevfusion.models.decoder.second", "bevfusion.models.decoder.secondfpn", "bevfusion.registry",
           "bevfusion.config")

SCRIPT = f"""
import importlib, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ImportError("blocked " + name)
sys.meta_path.insert(0, Block())
for m in {MODULES!r}:
    importlib.import_module(m)
print("ok")
"""


def test_core_modules_import_without_optional_packages():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
