"""What the cloud service is started with: ``ServiceConfig`` (model, backend, worker, limits) and
``HttpLimits`` (the HTTP front). Each option is declared once, as a field with its check and its
help (runtime/options.py); ``obclip-serve`` and Ray Serve's command make their flags from them.
"""

from __future__ import annotations

from dataclasses import dataclass

from obclip.runtime.errors import InputError
from obclip.runtime.memory import MEMORY_MODES
from obclip.runtime.options import check_fields, option
from obclip.runtime.plan import PRESETS
from obclip.runtime.protocol import RequestLimits

# How the onnxruntime backend's mode sessions allocate: runtime/memory.MEMORY_MODES says what each is;
# benchmarks/engine_memory.py --compare measures them side by side, docs/engines.md has the numbers.
# The default: faster than "none" on the narrow SD-shaped model with a lower peak (docs/engines.md).
DEFAULT_MEMORY = "shared+no-pattern"


@dataclass(frozen=True)
class HttpLimits:
    """The HTTP front: what a connection may cost before and around a request. Enforced by the
    uvicorn protocols of cloud/serve.py (with h11 or httptools alike) and, for the header count
    and size, again by the app; behind a reverse proxy, set the proxy's equivalents no looser."""

    max_header_bytes: int = option(16 * 1024, "request line + headers, else 431", ge=1)
    max_headers: int = option(64, "header fields, else 431", ge=1)
    header_timeout_s: float = option(10.0, "seconds to send a request head, from connect or the previous "
                                     "answer, else 408", gt=0, flag="--header-timeout")
    keep_alive_s: float = option(5.0, "seconds an idle connection stays open", gt=0, flag="--keep-alive")
    body_timeout_s: float = option(30.0, "seconds to send the request body, after its head, else 408", gt=0,
                                   flag="--body-timeout")
    send_timeout_s: float = option(60.0, "seconds an answer the client does not read is kept", gt=0,
                                   flag="--send-timeout")
    max_connections: int = option(256, "open connections; more are answered 503 and closed at once", ge=1)

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True)
class ServiceConfig:
    """Everything the service is started with; ``obclip-serve --help`` lists each field's flag."""

    model: str | None = option(None, "cloud model: a diffusers-layout directory or hub id (default: the "
                               "embedded mini model)")
    device: str = option("cpu", "torch device of the model: cpu, cuda, cuda:1, ...")
    dtype: str = option("float32", "torch dtype of the model", choices=("float32", "float16", "bfloat16"))
    host: str = option("127.0.0.1", "address to bind")
    port: int = option(8000, "port (0: any free port)", ge=0, le=65535)
    # Limits (runtime/protocol.py), all checked before any model work; a violation is a 4xx naming the limit.
    # None fields (image size, cost budget) are resolved for the loaded model (RequestLimits.for_model).
    limits: RequestLimits = RequestLimits()
    http: HttpLimits = HttpLimits()
    # The worker.
    queue_size: int = option(8, "requests waiting for the worker beside the one it runs; more get 503", ge=1)
    request_timeout_s: float = option(120.0, "seconds from arrival to answer, queue wait included, else 504",
                                      gt=0, flag="--timeout")
    retry_after_s: int = option(1, "Retry-After seconds on 503", ge=0, flag="--retry-after")
    warmup: bool = option(True, "ready as soon as the model is loaded (no warm-up request first)",
                          flag="--no-warmup")
    torch_threads: int | None = option(None, "torch intra-op threads of the worker (default: torch's)", ge=1)
    # Cross-request batching: the worker waits up to batch_window_ms after taking a request for
    # more with the same T, k, size, guidance and acceleration, and runs them as one UNet batch
    # of at most max_batch_rows rows (2 x the candidates of all its requests). 0: one at a time.
    batch_window_ms: float = option(10.0, "wait this long for requests with the same options to batch with; "
                                    "0: one at a time", ge=0)
    max_batch_rows: int = option(64, "UNet rows per batch, 2 x its candidates", ge=1)
    # A client that disconnects cancels its request (off where the server in front cannot tell).
    cancel_on_disconnect: bool = option(True, "a client that disconnects cancels its request", cli=False)
    # Privacy hygiene: candidates are logged only with this set (debugging only).
    log_prompts: bool = option(False, "DEBUGGING ONLY: write the candidate prompts to the log")
    # Backend: "torch" runs the model folder; "onnxruntime" the exported engines folder ``engines``
    # (OUT/cloud, or OUT/cloud-fp16) without torch, on onnxruntime's ``providers``.
    backend: str = option("torch", "torch: run --model; onnxruntime: run the exported --engines folder, "
                          "without torch", choices=("torch", "onnxruntime"))
    engines: str | None = option(None, "with --backend onnxruntime: the cloud engines folder, OUT/cloud (fp32) "
                                 "or OUT/cloud-fp16 (float16, for --providers cuda/tensorrt) of python "
                                 "export/build_engines.py --cloud-model ...")
    providers: str = option("cpu", "onnxruntime execution providers (cuda/tensorrt need onnxruntime-gpu)",
                            choices=("cpu", "cuda", "tensorrt"))
    engine_memory: str = option(DEFAULT_MEMORY, "onnxruntime backend: how the step-mode sessions allocate: none (no "
                                "arena), arena (one per session), shared (one for all), shared+prepack; "
                                "+shrink: the arena returns its free memory at the end of every run; "
                                "+no-pattern: without onnxruntime's per-session memory patterns",
                                choices=MEMORY_MODES)
    # onnxruntime backend: one call of every graph at start, on dummy inputs of warm_candidates
    # candidates at the warm-up size, so no request pays a session's first run.
    warm_graphs: bool = option(True, "onnxruntime backend: do not run every graph once at start",
                               flag="--no-warm-graphs")
    warm_candidates: int = option(4, "onnxruntime backend: candidates of the start-up call of every graph", ge=1)
    # torch backend: torch.compile each step mode (on CUDA, "reduce-overhead" replays each mode and
    # shape as a CUDA graph; cloud/torch_backend.py). Each "PRESET:N" of compile_warmup runs once at
    # the native size before /readyz is ready, so those modes and shapes are compiled up front.
    compile: bool = option(False, "torch backend: torch.compile each step mode (on CUDA replayed as CUDA graphs, "
                           "one per mode and shape); the first request of each mode and shape compiles")
    compile_warmup: tuple[str, ...] = option((), "with --compile: run these PRESET:N (e.g. paper-k10:6) at the "
                                             "native size before ready, so their modes and shapes are compiled "
                                             "up front", metavar="PRESET:N")

    def __post_init__(self) -> None:
        check_fields(self)
        if (self.backend == "onnxruntime") != bool(self.engines):
            raise InputError(f"backend must be torch, or onnxruntime with an engines folder; got backend="
                             f"{self.backend!r}, engines={self.engines!r}")
        if self.compile and self.backend != "torch":
            raise InputError("compile is for the torch backend (the onnxruntime backend runs exported graphs)")
        if self.compile_warmup and not self.compile:
            raise InputError("compile_warmup needs compile")
        for entry in self.compile_warmup:
            compile_warmup_entry(entry, self.limits.max_candidates)   # raises on a bad entry


def compile_warmup_entry(entry: str, max_candidates: int) -> tuple[str, int]:
    """"PRESET:N" -> (preset name, N); an InputError naming the expected form otherwise."""
    name, _, n = entry.partition(":")
    if name not in PRESETS or not n.isdigit() or not 1 <= int(n) <= max_candidates:
        raise InputError(f"compile warm-up {entry!r}: expected PRESET:N with PRESET one of {sorted(PRESETS)} and "
                         f"N in 1..{max_candidates} (max_candidates), e.g. paper-k10:6")
    return name, int(n)
