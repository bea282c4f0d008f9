"""What the tests share: paths in the checkout, loading a benchmark script as a module, and a harness
that runs cloud step modes one at a time (tests import this module; tests never import each other)."""

from __future__ import annotations

import http.client
import importlib.util
import socket
import sys
import threading
from pathlib import Path

import torch

from obclip.cloud.modes import TokenAlignment, mode_spec
from obclip.cloud.step_modes import AlignmentTensors, ModeInputs, processors_installed, run_mode

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS = REPO / "benchmarks"
TEST_DATA = REPO / "tests" / "data"


def load_benchmark(name: str):
    """benchmarks/NAME.py as a module, its folder on sys.path as when it runs as a script."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class ModeSteps:
    """Cloud steps run one at a time through ``run_mode`` on fixed texts, holding the caches between
    them as the cloud step loop (``cloud/steps.py``) does. One request (``cond`` [N, L, D], ``uncond``
    [1, L, D], ``alignment`` or None) or a batch of requests (sequences of each), as
    ``with ModeSteps(...) as steps: steps.guided_eps(x, t, step)``."""

    def __init__(self, unet, config, *, cond, uncond, guidance_scale, alignment=None, added=None):
        conds = [cond] if torch.is_tensor(cond) else list(cond)
        unconds = [uncond] * len(conds) if torch.is_tensor(uncond) else list(uncond)
        alignments = [alignment] * len(conds) if alignment is None or isinstance(alignment, TokenAlignment) \
            else list(alignment)
        self.unet, self.config, self.guidance_scale = unet, config, float(guidance_scale)
        self.sizes = tuple(int(c.shape[0]) for c in conds)
        self.text = torch.cat([t for u, c in zip(unconds, conds) for t in (u, c)])   # [empty, cands] per request
        self.alignment = tuple(None if al is None else AlignmentTensors.partitioned(al, self.text.device)
                               for al in alignments)
        self.added = added   # the UNet's added inputs, one row per text ([empty, cands] per request)
        self.caches: dict[str, torch.Tensor] = {}

    def __enter__(self) -> ModeSteps:
        self._installed = processors_installed(self.unet)
        self._installed.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.caches.clear()
        self._installed.__exit__(*exc)

    def split(self, t: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.split(t, list(self.sizes)))

    @torch.no_grad()
    def guided_eps(self, x, t, step):
        spec = mode_spec(self.config, step.index, step.mode)
        inputs = ModeInputs(x=x, timestep=t if torch.is_tensor(t) else torch.tensor(t), text=self.text,
                            guidance_scale=self.guidance_scale, sizes=self.sizes, alignment=self.alignment,
                            added=self.added)
        eps, writes = run_mode(self.unet, spec, inputs, self.caches)
        self.caches.update(writes)
        return eps


class Running:
    """A service served over real HTTP on 127.0.0.1:``port``, with raw HTTP calls and metric reads."""

    def __init__(self, service, port: int):
        self.service, self.port = service, port

    def http(self, method: str, path: str, body=None, headers=None, timeout: float = 60.0, **kw):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {}, **kw)
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def post(self, body: bytes, content_type: str = "application/json", **kw):
        return self.http("POST", "/v1/steps", body, {"Content-Type": content_type}, **kw)

    def sample(self, name: str, **labels) -> float:
        return self.service.metrics.registry.get_sample_value(name, labels) or 0.0


def serve_in_thread(service=None, *, config=None):
    """uvicorn in a background thread on an ephemeral port; returns (server, thread, port). It serves
    ``config`` (a ``uvicorn.Config``) or, by default, ``create_app(service=service)`` with its lifespan."""
    import uvicorn

    from obclip.cloud.http_app import create_app

    if config is None:
        config = uvicorn.Config(create_app(service=service), log_config=None, lifespan="on")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    return server, thread, sock.getsockname()[1]


def steps_request_bytes(**kw) -> bytes:
    """A small valid request's bytes (two candidates, 4 steps, k = 2, 64 px); ``kw`` overrides fields."""
    from obclip.runtime.protocol import StepsRequest

    fields = dict(candidates=("a photo of a man", "a photo of a woman"), seed=1, num_inference_steps=4,
                  switch_step=2, guidance_scale=7.5, height=64, width=64)
    fields.update(kw)
    return StepsRequest(**fields).to_bytes()
