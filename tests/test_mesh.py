"""Mesh topology, presets, collective pricing over the node hierarchy, serialization."""

import dataclasses
import json

import pytest
from conftest import write_profile

from autopar.cost import comm
from autopar.errors import AutoparError
from autopar.mesh import PRESET_NAMES, DeviceSpec, Mesh
from autopar.profile import CALIBRATION_VERSION

GIB = 2**30


@pytest.fixture
def two_nodes():
    return Mesh.preset("a100-80gb", nodes=2)


def test_presets_shape_and_constants():
    for name in PRESET_NAMES:
        mesh = Mesh.preset(name, nodes=3)
        assert (mesh.nodes, mesh.devices_per_node, mesh.world_size) == (3, 8, 24)
        assert mesh.intra_node_bw > mesh.inter_node_bw > 0
    assert Mesh.preset("a100-80gb").device.peak_flops == 312e12
    assert Mesh.preset("h100-80gb").device.peak_flops == 989e12
    assert Mesh.preset("a100-40gb").device.memory_bytes == 40 * GIB


def test_unknown_preset_lists_valid_names():
    with pytest.raises(AutoparError, match="a100-80gb.*h100-80gb"):
        Mesh.preset("tpu-v5")


def test_from_string():
    assert Mesh.from_string("a100-80gb:2") == Mesh.preset("a100-80gb", nodes=2)
    assert Mesh.from_string("h100-80gb").nodes == 1
    for bad in ("v100:2", "a100-80gb:two", "local"):
        with pytest.raises(AutoparError, match="a100-40gb"):
            Mesh.from_string(bad)
    with pytest.raises(AutoparError, match="nodes=0"):
        Mesh.from_string("a100-80gb:0")


def test_node_of(two_nodes):
    assert [two_nodes.node_of(r) for r in (0, 7, 8, 15)] == [0, 0, 1, 1]
    with pytest.raises(AutoparError, match="rank 16"):
        two_nodes.node_of(16)


def test_two_node_all_reduce_costs_more_by_the_bandwidth_ratio(two_nodes):
    nbytes = GIB
    one_node = two_nodes.collective_time("all_reduce", nbytes, range(8))
    both = two_nodes.collective_time("all_reduce", nbytes, range(16))
    # 16 ranks, 8 per node: eight NICs in parallel, capped by NVLink.
    cross_bw = min(8 * two_nodes.inter_node_bw, two_nodes.intra_node_bw)
    expected = two_nodes.intra_node_bw / cross_bw * (15 / 16) / (7 / 8)
    assert both > one_node
    assert both / one_node == pytest.approx(expected, rel=0.25)


def test_one_rank_per_node_sees_one_nic(two_nodes):
    nbytes = GIB
    t = two_nodes.collective_time("all_reduce", nbytes, [0, 8])
    expected = 2 * two_nodes.inter_node_latency + nbytes / two_nodes.inter_node_bw
    assert t == pytest.approx(expected)


@pytest.mark.parametrize("kind", comm.COLLECTIVE_KINDS)
def test_group_of_one_is_free(two_nodes, kind):
    assert two_nodes.collective_time(kind, GIB, [5]) == 0.0
    assert two_nodes.tp_collective_time(kind, GIB, 1) == 0.0


@pytest.mark.parametrize("kind", ["all_reduce", "all_gather", "reduce_scatter", "all_to_all"])
@pytest.mark.parametrize("group_size", [2, 8, 12, 16])
def test_tp_shortcut_matches_explicit_ranks(two_nodes, kind, group_size):
    explicit = two_nodes.collective_time(kind, 3 * GIB, range(group_size))
    assert two_nodes.tp_collective_time(kind, 3 * GIB, group_size) == pytest.approx(explicit)


def test_uneven_group_is_limited_by_its_thinnest_node(two_nodes):
    # 8 ranks on node 0, 1 on node 1: the lone rank has one NIC.
    t = two_nodes.collective_time("all_gather", GIB, range(9))
    link = GIB * (8 / 9) / two_nodes.inter_node_bw
    assert t == pytest.approx(8 * two_nodes.inter_node_latency + link)


@pytest.mark.parametrize(
    ("ranks", "match"),
    [([], "empty"), ([0, 16], r"\[16\]"), ([-1, 0], r"\[-1\]"), ([3, 3], r"\[3\]")],
)
def test_bad_rank_lists(two_nodes, ranks, match):
    with pytest.raises(AutoparError, match=match):
        two_nodes.collective_time("all_reduce", 1024, ranks)


def test_bad_kind_and_size(two_nodes):
    with pytest.raises(AutoparError, match="broadcast.*all_reduce.*send_recv"):
        two_nodes.collective_time("broadcast", 1024, [0, 1])
    with pytest.raises(AutoparError, match="nbytes=-1"):
        two_nodes.collective_time("all_reduce", -1, [0, 1])
    with pytest.raises(AutoparError, match="group_size=17"):
        two_nodes.tp_collective_time("all_reduce", 1024, 17)


def test_bad_constants_rejected():
    with pytest.raises(AutoparError, match="intra_node_bw=0"):
        dataclasses.replace(Mesh.preset("a100-80gb"), intra_node_bw=0)
    with pytest.raises(AutoparError, match="matmul_efficiency=1.5"):
        DeviceSpec("x", 1e12, 1e12, GIB, matmul_efficiency=1.5)


def test_dict_round_trip_is_json_safe(two_nodes):
    data = json.loads(json.dumps(two_nodes.to_dict()))
    assert Mesh.from_dict(data) == two_nodes
    assert Mesh.from_dict(data).fingerprint() == two_nodes.fingerprint()


def test_malformed_dict_names_expected_keys(two_nodes):
    data = two_nodes.to_dict()
    del data["device"]
    with pytest.raises(AutoparError, match="intra_node_bw"):
        Mesh.from_dict(data)
    with pytest.raises(AutoparError, match="malformed"):
        Mesh.from_dict({**two_nodes.to_dict(), "colour": "blue"})


def test_fingerprint_changes_with_any_constant(two_nodes):
    faster = dataclasses.replace(two_nodes, inter_node_bw=two_nodes.inter_node_bw * 2)
    device = dataclasses.replace(two_nodes.device, matmul_efficiency=0.5)
    prints = {
        m.fingerprint() for m in (two_nodes, faster, dataclasses.replace(two_nodes, device=device))
    }
    assert len(prints) == 3


def test_describe(two_nodes):
    text = two_nodes.describe()
    assert "2 nodes x 8 A100-SXM4-80GB" in text and "312 TFLOP/s" in text
    assert "inter-node" in text and "\n" not in text


def test_local_without_calibration_uses_cpu_defaults(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.cache/autopar/calibration.json
    mesh = Mesh.local(4)
    assert (mesh.nodes, mesh.world_size, mesh.device.dtype_bytes) == (1, 4, 4)
    assert "uncalibrated" in mesh.device.name


def test_from_string_local(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert Mesh.from_string("local:3") == Mesh.local(3)


def test_local_reads_calibration_file(tmp_path):
    path = write_profile(tmp_path / "cal.json", worlds=(1, 2, 3, 4), cores=2, matmul_flops=200e9)
    mesh = Mesh.local(2, calibration=path)
    assert mesh.device.peak_flops == 200e9  # each rank's rate with both ranks busy
    assert mesh.device.memory_bytes == 8 * GIB
    assert mesh.device.op_overhead_s == 5e-6 and mesh.idle_speedup == 1.0
    shared = Mesh.local(4, calibration=path)
    assert shared.device.peak_flops == 100e9  # four ranks on two cores
    assert shared.idle_speedup == pytest.approx(2.0)
    assert Mesh.from_profile(path) == shared  # the profile's largest world by default


def test_ranks_beyond_the_cores_share_them_per_cpu_second(tmp_path):
    path = write_profile(tmp_path / "cal.json", worlds=(1, 2, 3, 4), cores=2)
    three = Mesh.local(3, calibration=path).device
    assert three.peak_flops == pytest.approx(100e9 * 2 / 3)  # per CPU second x core share
    assert three.memory_bandwidth == pytest.approx(10e9 * 2 / 3)
    assert three.optimizer_bandwidth == pytest.approx(20e9 * 2 / 3)
    assert three.op_overhead_s == pytest.approx(5e-6 * 3 / 2)  # seconds stretch instead
    assert three.backward_op_overhead_s == pytest.approx(4e-6 * 3 / 2)
    data = json.loads(path.read_text())
    path.write_text(json.dumps(data | {"compute_clock": "wall"}))  # GPUs: nothing shared
    gpu = Mesh.local(3, calibration=path)
    assert gpu.device.peak_flops == 100e9 and gpu.idle_speedup == 1.0


def test_local_rejects_missing_or_bad_calibration(tmp_path):
    with pytest.raises(AutoparError, match="autopar calibrate"):
        Mesh.local(2, calibration=tmp_path / "absent.json")
    bad = tmp_path / "bad.json"
    compute = {"compute": {"matmul_flops": "x"}}
    bad.write_text(json.dumps({"version": CALIBRATION_VERSION, "worlds": {"2": compute}}))
    with pytest.raises(AutoparError, match="matmul_flops"):
        Mesh.local(2, calibration=bad)
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"matmul_flops": 1e9, "allreduce_bus_bw": 1e9}))
    with pytest.raises(AutoparError, match="version None"):
        Mesh.local(2, calibration=old)
    with pytest.raises(AutoparError, match="--world-size 8"):
        Mesh.local(8, calibration=write_profile(tmp_path / "two.json", worlds=(1, 2)))


def test_measured_fits_price_their_kind_and_group_size(tmp_path):
    mesh = Mesh.local(4, calibration=write_profile(tmp_path / "c.json", worlds=(1, 2, 3, 4)))
    fit = comm.collective_time("all_gather", 2**20, 2, 1e9, 50e-6)
    assert mesh.collective_time("all_gather", 2**20, [0, 1]) == pytest.approx(fit)
    assert mesh.tp_collective_time("all_gather", 2**20, 2) == pytest.approx(fit)
    refit = dataclasses.replace(
        mesh, collective_fits=(comm.CollectiveFit("all_gather", 2, 2e9, 0),)
    )
    assert refit.tp_collective_time("all_gather", 2**20, 2) == pytest.approx(fit / 2, rel=0.1)
    assert Mesh.from_dict(json.loads(json.dumps(mesh.to_dict()))) == mesh
