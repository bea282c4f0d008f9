"""cloud/local.py: the main job's child service on loopback starts, answers and is stopped."""

from __future__ import annotations

import pytest

from obclip.app.local import LocalService, LocalServiceConfig, LocalServiceError

pytestmark = pytest.mark.service


def test_child_service_answers_then_is_stopped(model_dirs):
    from obclip.device.client import ClientConfig, ServiceClient
    from obclip.runtime.protocol import StepsRequest

    with LocalService(LocalServiceConfig(model=str(model_dirs[0]))) as service:
        assert service.url.startswith("http://127.0.0.1:")
        client = ServiceClient(ClientConfig(service.url, timeout_s=60, retries=0))
        body = StepsRequest(("a photo of a man", "a photo of a woman"), 1, 4, 2, 7.5, 64, 64).to_bytes()
        assert client(body).latents.shape[0] >= 1
        proc = service.proc
    assert proc.returncode is not None  # stopped, not left running
    assert not ServiceClient(ClientConfig(service.url, timeout_s=2, retries=0)).ready()


def test_child_that_cannot_start_is_a_clear_error(tmp_path):
    with pytest.raises(LocalServiceError, match="(?s)exited with status 2.*does not exist"):
        with LocalService(LocalServiceConfig(model=str(tmp_path / "no-such-model"))):
            pass


def test_config_is_checked():
    with pytest.raises(ValueError, match="positive"):
        LocalServiceConfig(ready_timeout_s=0)
