"""config.mesh (kimi_jax.config.MeshConfig) and loop.make_mesh: sizes with a -1, the DCN split over TPU slices
(a hybrid mesh on libtpu's compile-only devices of 2 slices), and errors that name the field."""

import jax
import numpy as np
import pytest

from kimi_jax.config import MeshConfig
from kimi_jax.train import loop


def test_resolve_fills_the_free_axes():
    sizes, dcn = MeshConfig(data=-1, fsdp=4, expert=16).resolve(256, num_slices=2)
    assert sizes == {"data": 4, "fsdp": 4, "expert": 16, "tensor": 1}
    assert dcn == {"data": 2, "fsdp": 1, "expert": 1, "tensor": 1}          # slices are data parallel by default
    sizes, dcn = MeshConfig(data=1, fsdp=-1, expert=16, dcn_data=1, dcn_fsdp=2).resolve(256, num_slices=2)
    assert sizes["fsdp"] == 16 and dcn["fsdp"] == 2 and dcn["data"] == 1
    assert MeshConfig().resolve(8) == ({"data": 8, "fsdp": 1, "expert": 1, "tensor": 1},
                                       {"data": 1, "fsdp": 1, "expert": 1, "tensor": 1})


@pytest.mark.parametrize("fields, devices, slices, message", [
    ({"data": -1, "fsdp": -1}, 8, 1, r"at most one of \['data', 'fsdp', 'expert', 'tensor'\] may be -1"),
    ({"expert": 0}, 8, 1, "config.mesh.expert must be an integer >= 1 or -1, got 0"),
    ({"data": 2, "fsdp": 2}, 8, 1, "config.mesh: data=2 x fsdp=2 x expert=1 x tensor=1 = 4 does not equal the 8 "
                                   "devices"),
    ({"fsdp": 3}, 8, 1, "config.mesh: 8 devices are not divisible by fsdp=3 x expert=1 x tensor=1 = 3"),
    ({"data": 1, "fsdp": -1}, 8, 2, "config.mesh.data=1 cannot be split across config.mesh.dcn_data=2 slices"),
    ({"dcn_expert": 4}, 8, 2, "config.mesh: 2 slices are not divisible by dcn_fsdp=1 x dcn_expert=4"),
    ({"tensr": 2}, 8, 1, r"config.mesh has unknown fields \['tensr'\]"),
])
def test_errors_name_the_field(fields, devices, slices, message):
    with pytest.raises(ValueError, match=message):
        MeshConfig.from_config(fields).resolve(devices, slices)


def test_make_mesh_on_cpu_devices_takes_a_four_axis_section():
    mesh = loop.make_mesh({"data": -1, "fsdp": 2, "expert": 2, "tensor": 1})     # no dcn_* keys: defaults
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "expert": 2, "tensor": 1}
    assert list(mesh.devices.flat) == jax.devices()


def _slices(mesh) -> np.ndarray:
    return np.vectorize(lambda d: d.slice_index)(mesh.devices)


@pytest.mark.parametrize("fields, dcn_axis", [
    ({"data": 2, "fsdp": -1}, 0),                                          # default: data over DCN
    ({"data": 1, "fsdp": -1, "dcn_data": 1, "dcn_fsdp": 2}, 1),            # fsdp over DCN
])
def test_make_mesh_over_two_tpu_slices_puts_the_dcn_axis_across_slices(fields, dcn_axis):
    pytest.importorskip("libtpu", reason="compile-only TPU devices need libtpu (requirements-aot.txt)")
    from kimi_jax.train import aot
    devices = aot.tpu_topology("v5p-8", num_slices=2)                      # 2 slices x 4 chips
    mesh = loop.make_mesh(fields, devices)
    slices = _slices(mesh)
    assert mesh.shape["data"] * mesh.shape["fsdp"] == 8
    # the first half of the DCN axis is slice 0, the second slice 1; every other axis stays inside a slice
    first, second = np.split(slices, 2, axis=dcn_axis)
    assert (first == 0).all() and (second == 1).all()
