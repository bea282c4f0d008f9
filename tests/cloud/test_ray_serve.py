"""The cloud service on Ray Serve (cloud/ray_serve.py): one local Ray (2 CPUs, no GPU) and one
CPU replica of the small random cloud model for the whole module, under a route prefix, driven
through Ray's HTTP proxy with the device's own client. Skipped where Ray Serve is not installed."""

from __future__ import annotations

import http.client
import json
import os
import socket

import pytest

pytest.importorskip("ray.serve", reason="Ray Serve is not installed: pip install 'obclip[ray]'")

import ray  # noqa: E402
from ray import serve  # noqa: E402

from obclip.cloud.ray_serve import APP_NAME, DEPLOYMENT_NAME, RayOptions, build_app  # noqa: E402
from obclip.cloud.service_config import ServiceConfig  # noqa: E402
from obclip.device.client import ClientConfig, ServiceClient, ServiceRejected  # noqa: E402
from obclip.runtime.errors import ServiceError  # noqa: E402
from obclip.runtime.protocol import (
    RequestLimits,  # noqa: E402
    StepsRequest,  # noqa: E402
)

pytestmark = pytest.mark.service

PREFIX = "/obclip"
MAX_N = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_url(model_dirs):
    """Ray started here, Serve's proxy on a free loopback port; yields the app's base URL."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage report from a test run
    ray.init(address="local", num_cpus=2, num_gpus=0, object_store_memory=100 * 1024 ** 2,
             include_dashboard=False, logging_level="WARNING")
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        config = ServiceConfig(model=str(model_dirs[0]), device="cpu", limits=RequestLimits(max_candidates=MAX_N),
                               request_timeout_s=60.0, batch_window_ms=0)
        # Returns once the replica is built, i.e. once its model is loaded and warmed up.
        serve.run(build_app(config, RayOptions(replicas=1, cpus_per_replica=1)), name=APP_NAME, route_prefix=PREFIX)
        yield f"http://127.0.0.1:{port}{PREFIX}"
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def fetch(url: str, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    host, port = url.split("//")[1].split("/")[0].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.request(method, PREFIX + path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def request_bytes(n: int = 2, negative_prompt: str = "") -> bytes:
    people = ("a photo of a man", "a photo of a woman", "a photo of a child", "a photo of an old man",
              "a photo of an old woman")
    return StepsRequest(people[:n], 1, 4, 2, 7.5, 64, 64, negative_prompt=negative_prompt).to_bytes()


def test_replica_is_healthy_and_ready(ray_url):
    status = serve.status().applications[APP_NAME]
    assert status.status == "RUNNING"
    deployment = status.deployments[DEPLOYMENT_NAME]
    assert deployment.status == "HEALTHY" and deployment.replica_states.get("RUNNING") == 1
    assert ServiceClient(ClientConfig(ray_url, timeout_s=30, retries=0)).ready()
    code, _, body = fetch(ray_url, "GET", "/readyz")
    assert code == 200 and json.loads(body)["status"] == "ready"
    code, headers, body = fetch(ray_url, "GET", "/metrics")
    assert code == 200 and headers["content-type"].startswith("text/plain")
    assert "obclip_ready 1.0" in body.decode()


def test_steps_through_ray_is_a_valid_handoff(ray_url):
    client = ServiceClient(ClientConfig(ray_url, timeout_s=60, retries=0))
    body = request_bytes()
    handoff = client(body)  # the client validates the handoff
    assert handoff.latents.shape == (2, 4, 16, 16) and handoff.step_index == 2
    assert client.last_call.server_run_s is not None  # Server-Timing came through the proxy


def test_negative_prompt_through_ray_conditions_the_unconditional_row(ray_url, cloud_runner):
    """The replica runs the request's negative prompt exactly as the in-process runner does, and it
    changes the answer (it is not dropped on the way through Serve's proxy)."""
    import numpy as np

    client = ServiceClient(ClientConfig(ray_url, timeout_s=60, retries=0))
    with_negative = request_bytes(negative_prompt="blurry, low quality")
    through_ray = client(with_negative).latents
    expected = StepsRequest.from_bytes(with_negative)
    in_process = cloud_runner.run(expected).latents
    assert np.abs(through_ray - in_process).max() <= 1e-4  # another process, other thread count
    assert np.abs(through_ray - client(request_bytes()).latents).max() > 1e-3


def test_limit_violation_is_the_service_json_error(ray_url):
    body = request_bytes(MAX_N + 1)
    with pytest.raises(ServiceRejected) as e:
        ServiceClient(ClientConfig(ray_url, timeout_s=60, retries=0))(body)
    assert e.value.status == 422 and e.value.code == "too_many_candidates"
    code, headers, data = fetch(ray_url, "POST", "/v1/steps", body, {"Content-Type": "application/json"})
    assert code == 422 and headers["content-type"] == "application/json"
    err = json.loads(data)["error"]
    assert err["limit"] == {"name": "max_candidates", "max": MAX_N, "got": MAX_N + 1}
    # the app's own 404 under the prefix, not Ray's
    code, headers, data = fetch(ray_url, "GET", "/nope")
    assert code == 404 and json.loads(data)["error"]["code"] == "not_found"


def test_check_health_fails_until_the_service_is_ready(model_dirs):
    from obclip.cloud.ray_serve import CloudReplica

    replica = CloudReplica(ServiceConfig(model=str(model_dirs[0])))  # not started: no model loaded
    with pytest.raises(ServiceError, match="not ready"):
        replica.check_health()
