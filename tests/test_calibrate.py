"""`autopar calibrate` on this machine: real gloo processes, tiny sizes."""

import pytest

from autopar.calibrate import CalibrationSizes, calibrate, fit_alpha_beta, format_calibration
from autopar.errors import AutoparError
from autopar.mesh import Mesh
from autopar.profile import CALIBRATION_KEYS

TINY = CalibrationSizes(
    matmul_dim=64,
    copy_bytes=2**20,
    small_message_bytes=64,
    large_message_bytes=2**20,
    repeats=3,
    small_message_repeats=5,
)


@pytest.mark.multiprocess
def test_calibrate_writes_what_mesh_local_reads(tmp_path):
    path = tmp_path / "calibration.json"
    result = calibrate(world_size=2, sizes=TINY, out_path=path)
    assert all(result[key] >= 0 for key in CALIBRATION_KEYS)
    assert min(result[k] for k in CALIBRATION_KEYS if k != "allreduce_latency") > 0
    mesh = Mesh.local(2, calibration=path)
    assert mesh.device.peak_flops == pytest.approx(result["matmul_flops"] / 2)
    assert mesh.intra_node_bw == pytest.approx(result["allreduce_bus_bw"])
    assert mesh.intra_node_latency == pytest.approx(result["allreduce_latency"])
    assert "GFLOP/s" in format_calibration(result)


def test_fit_recovers_alpha_and_beta():
    # 2 ranks: t = 2 * alpha + S / B with alpha = 50 us, B = 1 GB/s.
    sizes = CalibrationSizes(small_message_bytes=1_000, large_message_bytes=10_000_000)
    fit = fit_alpha_beta(2, sizes, 100e-6 + 1e-6, 100e-6 + 10e-3)
    assert fit["allreduce_bus_bw"] == pytest.approx(1e9)
    assert fit["allreduce_latency"] == pytest.approx(50e-6)
    assert fit["allreduce_fit"] == "two-point"


def test_fit_falls_back_to_bounds_when_noise_hides_the_slope():
    sizes = CalibrationSizes(small_message_bytes=1_000, large_message_bytes=2_000)
    fit = fit_alpha_beta(2, sizes, 3e-4, 2e-4)
    assert fit["allreduce_fit"] == "bounds"
    assert fit["allreduce_bus_bw"] == pytest.approx(2_000 / 2e-4)


def test_one_rank_cannot_calibrate_collectives(tmp_path):
    with pytest.raises(AutoparError, match="world_size=1"):
        calibrate(world_size=1, sizes=TINY, out_path=tmp_path / "c.json")
