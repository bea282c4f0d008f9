"""The cloud service as a child process on loopback, for the main job and benchmarks.

    with LocalService(LocalServiceConfig(model="/models/stable-diffusion-v1-4")) as service:
        generate_image(prompt, service.url, engines, config)

The parent binds 127.0.0.1 on a free port and hands the bound socket to
``python -m obclip.cloud.serve --fd N``: no port race, and nothing listens beyond
this machine. Entering waits for GET /readyz (model loaded and warmed);
leaving sends SIGINT (uvicorn's graceful shutdown) and kills the child if it
has not exited in time. The device side talks to it over real HTTP, exactly
as it would to a remote service.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import IO

from obclip.device.client import ClientConfig, ServiceClient
from obclip.runtime.errors import ServiceError
from obclip.runtime.options import check_fields, option


class LocalServiceError(ServiceError):
    """The child service did not come up; the message carries the tail of its log."""


@dataclass(frozen=True)
class LocalServiceConfig:
    model: str | None = None          # cloud model dir or hub id; None: the embedded default
    serve_args: tuple[str, ...] = ()  # more `python -m obclip.cloud.serve` flags, e.g. ("--batch-window-ms", "0")
    log_level: str = "warning"
    ready_timeout_s: float = option(600.0, "seconds for loading + warm-up; a cold SD-v1.4 load can take minutes",
                                    gt=0)
    stop_timeout_s: float = option(30.0, "seconds for a graceful stop before the child is killed", gt=0)
    env: dict[str, str] = field(default_factory=dict)  # extra environment, e.g. {"OMP_NUM_THREADS": "1"}

    def __post_init__(self) -> None:
        check_fields(self)


class LocalService:
    """Start `python -m obclip.cloud.serve` on a free loopback port; stop it on exit."""

    def __init__(self, config: LocalServiceConfig = LocalServiceConfig()):
        self.config = config
        self.url: str | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[str] | None = None

    @property
    def ready_url(self) -> str:
        """The service's base URL; only inside the ``with`` block."""
        if self.url is None:
            raise RuntimeError("the local service is not running; use it as `with LocalService(...) as s:`")  # a bug
        return self.url

    def __enter__(self) -> LocalService:
        cfg = self.config
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)  # connections made before uvicorn starts wait in the backlog
        port = sock.getsockname()[1]
        cmd = [sys.executable, "-m", "obclip.cloud.serve", "--fd", str(sock.fileno()), "--log-level", cfg.log_level]
        if cfg.model is not None:
            cmd += ["--model", str(cfg.model)]
        cmd += list(cfg.serve_args)
        self._log = tempfile.TemporaryFile(mode="w+")
        try:
            self.proc = subprocess.Popen(cmd, pass_fds=(sock.fileno(),), stdin=subprocess.DEVNULL,
                                         stdout=self._log, stderr=subprocess.STDOUT,
                                         env={**os.environ, **cfg.env})
        finally:
            sock.close()  # the child holds its own copy
        self.url = f"http://127.0.0.1:{port}"
        client = ServiceClient(ClientConfig(self.url, timeout_s=5.0, retries=0))
        deadline = time.monotonic() + cfg.ready_timeout_s
        while not client.ready():
            if self.proc.poll() is not None:
                log = self.log_tail()
                self._close_log()
                raise LocalServiceError(f"the cloud service exited with status {self.proc.returncode} "
                                        f"before it was ready:\n{log}")
            if time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise LocalServiceError(f"the cloud service was not ready within {cfg.ready_timeout_s:.0f} s")
            time.sleep(0.2)
        return self

    def log_tail(self, chars: int = 4000) -> str:
        """The end of the child's stdout and stderr (empty once stopped)."""
        if self._log is None or self._log.closed:
            return ""
        self._log.flush()
        self._log.seek(0)
        return self._log.read()[-chars:]

    def _close_log(self) -> None:
        if self._log is not None and not self._log.closed:
            self._log.close()

    def __exit__(self, *exc) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # graceful: in-flight requests finish or time out
            try:
                proc.wait(timeout=self.config.stop_timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._close_log()
