"""A replica given part of a GPU says so when no CUDA MPS daemon is there to run its kernels
side by side with its neighbours' (serving/gpu_sharing.py)."""

from __future__ import annotations

import os

from serving.gpu_sharing import hold_warning, mps_daemon_found, sharing_warning


def test_warns_only_for_a_shared_cuda_device_without_mps():
    message = sharing_warning(0.5, "cuda", mps=False)
    assert message is not None
    assert "0.5 of a GPU" in message and "nvidia-cuda-mps-control -d" in message
    assert sharing_warning(0.5, "cuda:1", mps=False) is not None
    assert sharing_warning(0.5, "cuda", mps=True) is None  # the daemon is there
    assert sharing_warning(1.0, "cuda", mps=False) is None  # a whole GPU: nobody to share with
    assert sharing_warning(2.0, "cuda", mps=False) is None
    assert sharing_warning(0.0, "cuda", mps=False) is None  # no GPU assigned (CPU replica)
    assert sharing_warning(None, "cuda", mps=False) is None  # outside Ray: share unknown
    assert sharing_warning(0.5, "cpu", mps=False) is None


def test_warns_of_a_decode_hold_only_on_a_gpu_of_its_own():
    message = hold_warning(1.0, "cuda", decode_hold_ms=1000)
    assert message is not None and "decode_hold_ms is 1000" in message
    assert hold_warning(0.5, "cuda", decode_hold_ms=1000) is None  # shared: what it is for
    assert hold_warning(1.0, "cuda", decode_hold_ms=0) is None  # off
    assert hold_warning(None, "cuda", decode_hold_ms=1000) is None  # outside Ray: share unknown
    assert hold_warning(0.0, "cpu", decode_hold_ms=50) is None  # CPU replicas share the cores


def test_finds_the_daemon_by_its_control_pipe(tmp_path):
    env = {"CUDA_MPS_PIPE_DIRECTORY": str(tmp_path)}
    assert not mps_daemon_found(env)
    os.mkfifo(tmp_path / "control")  # what nvidia-cuda-mps-control -d creates there
    assert mps_daemon_found(env)
    assert not mps_daemon_found({"CUDA_MPS_PIPE_DIRECTORY": str(tmp_path / "elsewhere")})
