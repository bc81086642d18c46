"""`mmctl serve`: a checkpoint behind OpenAI's HTTP API, so the clients people already use can talk to it.

The routes, the bounded queue and the batching decoder are mmctl/server.py; the model and its prompts are
mmctl/session.py (shared with `mmctl chat`). This file binds the socket and runs uvicorn until Ctrl-C or SIGTERM,
which stop taking new connections and finish the requests in flight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mmctl.console import console
from mmctl.errors import UsageError
from mmctl.recipe import option


@dataclass
class ServeConfig:
    checkpoint: str = option(None, "the checkpoint directory", required=True)
    host: str = option("127.0.0.1", "the address to listen on (127.0.0.1: this machine only; 0.0.0.0: every "
                                    "network the machine is on)")
    port: int = option(8000, "the port (0: any free one, printed as the server starts)", ge=0, le=65535)
    name: str | None = option(None, "the model's name in the API (`model` in requests); unset: the checkpoint path")
    device: Literal["auto", "cpu", "cuda", "mps"] = option("auto", "auto: cuda, then mps, then cpu")
    batch_size: int = option(8, "requests decoded together, at most", ge=1, le=1024)
    queue: int = option(256, "requests waiting, at most (more are answered 503 with Retry-After)", ge=1, le=100_000)
    max_tokens: int = option(256, "tokens a completion may ask for (and gets when it does not say)", ge=1,
                             le=2**20)
    max_request_bytes: int = option(4 << 20, "the largest request body (larger ones are answered 413)", ge=1024,
                                    le=1 << 30)


def run(cfg: ServeConfig) -> None:
    import signal
    import socket

    try:
        import fastapi  # noqa: F401 - mmctl/server.py's
        import uvicorn
    except ImportError:
        raise UsageError("mmctl serve needs FastAPI and uvicorn: pip install 'mmctl[serve]'") from None

    from mmctl.batcher import Batcher
    from mmctl.runtime import Dist, announce, pick_device
    from mmctl.server import make_app
    from mmctl.session import Session

    session = Session(cfg.checkpoint, device=pick_device(cfg.device))
    name = cfg.name or cfg.checkpoint
    batcher = Batcher(session, cfg.batch_size, cfg.queue)
    app = make_app(session, name, batcher, cfg.max_tokens, cfg.max_request_bytes)
    family = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((cfg.host, cfg.port))
    except OSError as e:
        sock.close()
        raise UsageError(f"--host {cfg.host} --port {cfg.port}: {e.strerror} (--port 0 picks a free port)") from None
    port = sock.getsockname()[1]
    announce(Dist(device=str(session.model.device)))
    kind = "chat model" if session.chat else "language model (no chat template: /v1/completions)"
    console.print(f"serving {name} ({kind}) at http://{cfg.host}:{port}/v1 — OpenAI-compatible; Ctrl-C stops",
                  soft_wrap=True)
    stops: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):  # uvicorn stops on them, then raises them again: done, not failed
        signal.signal(sig, lambda signum, frame: stops.append(signum))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=30, lifespan="on"))
    server.run(sockets=[sock])
    console.print(f"stopped; {batcher.answered} completions served")
