"""The `spatial` mesh axis: mesh shapes, volume placement and the errors before compiling."""

import numpy as np
import pytest

from jaxmamba.config import ConfigError, from_dict
from jaxmamba.ops.mesh import MeshError, check_patch_splits, local_mesh, make_mesh
from jaxmamba.train import sharding


def test_mesh_has_data_and_spatial_axes():
    mesh = make_mesh(-1, spatial=2)
    assert dict(mesh.shape) == {"data": 2, "spatial": 2}
    assert dict(make_mesh(1, spatial=4).shape) == {"data": 1, "spatial": 4}
    assert dict(local_mesh(spatial=2).shape) == {"data": 2, "spatial": 2}
    batch = {"image": np.zeros((2, 8, 4, 4, 1), np.float32),
             "target": (np.zeros((2, 8, 4, 4), np.int32), np.zeros((2, 1, 2, 2), np.int32))}
    placed = sharding.global_batch(batch, mesh)
    assert {s.data.shape for s in placed["image"].addressable_shards} == {(1, 4, 4, 4, 1)}
    # a low-resolution target whose S0 does not split stays whole along S0
    assert {s.data.shape for s in placed["target"][1].addressable_shards} == {(1, 1, 2, 2)}


def test_spatial_must_divide_the_devices():
    with pytest.raises(MeshError, match=r"mesh.spatial = 3: must divide the 4 .*\[1, 2, 4\]"):
        make_mesh(-1, spatial=3)
    with pytest.raises(MeshError, match="mesh.data = 3: .*from 1 to 2"):
        make_mesh(3, spatial=2)
    with pytest.raises(MeshError, match=r"--spatial = 3: must divide the 4"):
        local_mesh(spatial=3)
    with pytest.raises(ConfigError, match="mesh.spatial = 0: must be >= 1"):
        from_dict({"data": {"raw_dir": "x"}, "mesh": {"spatial": 0}})


def test_patch_must_split_after_the_total_stride():
    strides = ((1, 1, 1), (2, 2, 2), (2, 2, 2))  # total stride 4 on S0
    check_patch_splits((16, 8, 8), strides, 4, devices=4)  # 16 / 4 = 4 splits in 4
    check_patch_splits((12, 8, 8), strides, 1, devices=4)
    with pytest.raises(MeshError, match=r"\[12, 8, 8\]: .* stride 4 on S0 is 3 .* multiple of 2. "
                                        r"Use mesh.spatial = one of \[1\], or a patch S0 of 8 or "
                                        r"16 \(e.g. data.plan_overrides.patch_size=\[16, 8, 8\]\)"):
        check_patch_splits((12, 8, 8), strides, 2, devices=4)
    with pytest.raises(MeshError, match=r"one of \[1, 2\], or a patch S0 of 16 \(e.g. .*\[16, 8, "
                                        r"8\]\)"):
        check_patch_splits((8, 8, 8), strides, 4, devices=4)
    with pytest.raises(MeshError, match=r"--spatial = 4 .* one of \[1, 2\]$"):  # a trained patch
        check_patch_splits((8, 8, 8), strides, 4, devices=4, name="--spatial", patch_key=None)
