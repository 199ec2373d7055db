"""`autopar calibrate` on this machine: real gloo processes, tiny sizes; the fits."""

import json

import pytest

from autopar.calibrate import CalibrationSizes, calibrate, format_calibration
from autopar.calibrate.collectives import fit_alpha_beta
from autopar.calibrate.compute import ComputeSizes
from autopar.cost.comm import COLLECTIVE_KINDS
from autopar.cost.sharing import core_share
from autopar.errors import AutoparError
from autopar.mesh import Mesh
from autopar.profile import COMPUTE_KEYS

TINY = CalibrationSizes(
    compute=ComputeSizes(
        matmul_sizes=((32, 32),), elementwise_numel=2**12, overhead_chain=8,
        loss_bytes=(2**20, 2**21), optimizer_params=2, optimizer_param_numel=2**12,
        window_s=0.01, windows=1,
    ),
    message_bytes=(256, 4096),
    repeats=2,
)  # fmt: skip


@pytest.mark.multiprocess
def test_calibrate_writes_a_profile_mesh_local_reads(tmp_path):
    path = tmp_path / "calibration.json"
    heard = []
    result = calibrate(world_size=3, sizes=TINY, out_path=path, progress=heard.append)
    assert json.loads(path.read_text()) == json.loads(json.dumps(result))
    assert sorted(result["worlds"]) == ["1", "2", "3"]
    assert any("3 of 3 ranks busy" in text for text in heard)
    for world in ("1", "2", "3"):
        compute = result["worlds"][world]["compute"]
        assert all(compute[k] >= 0 for k in COMPUTE_KEYS) and compute["matmul_flops"] > 0
    two, three = result["worlds"]["2"]["collectives"], result["worlds"]["3"]["collectives"]
    assert set(two) == set(COLLECTIVE_KINDS) and set(two["all_reduce"]) == {"2"}
    assert set(three["all_gather"]) == {"3"} and set(three["send_recv"]) == {"2"}
    mesh = Mesh.local(3, calibration=path)
    share = core_share(3, result["cores"])  # per CPU second in the file, per wall second here
    assert mesh.device.peak_flops == pytest.approx(
        result["worlds"]["3"]["compute"]["matmul_flops"] * share
    )
    loss = result["worlds"]["3"]["compute"]["loss_seconds_per_byte"]
    assert [size for size, _ in loss] == [2**20, 2**21]
    assert mesh.device.loss_seconds_per_byte == pytest.approx(
        [(size, seconds / share) for size, seconds in loss]
    )
    optimizer = result["worlds"]["3"]["compute"]["optimizer_bandwidth"]
    assert mesh.device.optimizer_bandwidth == pytest.approx(optimizer * share) and optimizer > 0
    assert mesh == Mesh.from_profile(path)
    fit = three["reduce_scatter"]["3"]
    assert mesh.tp_collective_time("reduce_scatter", 0, 3) == pytest.approx(2 * fit["latency"])
    assert "GFLOP/s" in format_calibration(result) and "groups of 3" in format_calibration(result)


def test_fit_recovers_alpha_and_beta():
    # 2 ranks: t = 2 * alpha + S / B with alpha = 50 us, B = 1 GB/s.
    points = [(s, 100e-6 + s / 1e9) for s in (1_000, 1_000_000, 10_000_000)]
    fit = fit_alpha_beta("all_reduce", 2, points)
    assert fit["bus_bw"] == pytest.approx(1e9)
    assert fit["latency"] == pytest.approx(50e-6)
    assert fit["fit"] == "least-squares"
    a2a = fit_alpha_beta("all_to_all", 4, [(s, 3e-4 + s * 3 / 16 / 2e9) for s in (1e3, 1e7)])
    assert (a2a["bus_bw"], a2a["latency"]) == (pytest.approx(2e9), pytest.approx(1e-4))


def test_fit_falls_back_to_bounds_when_noise_hides_the_slope():
    fit = fit_alpha_beta("all_reduce", 2, [(1_000, 3e-4), (2_000, 2e-4)])
    assert fit["fit"] == "bounds"
    assert fit["bus_bw"] == pytest.approx(2_000 / 2e-4)


def test_bad_calibrate_arguments(tmp_path):
    with pytest.raises(AutoparError, match="world_size=1"):
        calibrate(world_size=1, sizes=TINY, out_path=tmp_path / "c.json")
    with pytest.raises(AutoparError, match="gloo, nccl"):
        calibrate(world_size=2, sizes=TINY, out_path=tmp_path / "c.json", backend="mpi")
