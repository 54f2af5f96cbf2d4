"""python -m tinyinfer.serve: the OpenAI-compatible server (serve/app.py) on uvicorn.

    python -m tinyinfer.serve --ckpt models/shakespeare-llama --port 8000
    curl localhost:8000/v1/completions -H 'Content-Type: application/json' \\
         -d '{"prompt": "ROMEO:", "max_tokens": 32}'
    open http://127.0.0.1:8000/ in a browser: the chat page (--no-web leaves it out)

SIGINT / SIGTERM shut it down gracefully: no new connections, running requests finish (up to
--shutdown-timeout seconds, then they are cancelled and aborted), then the engine thread stops, and
the process ends as the signal says (killed by SIGTERM; exit 130 after SIGINT), uvicorn's convention.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys

from tinyinfer.cli import add_engine_arguments, apply_threads, engine_options
from tinyinfer.config.errors import CheckpointError, ConfigError
from tinyinfer.config.help import HelpFormatter
from tinyinfer.toolcalls.formats import FORMATS


def served_name(ckpt: str) -> str:
    """The default model name: a directory's name, a file's name without its extension
    (SmolLM2-135M-Instruct.Q4_1.gguf -> SmolLM2-135M-Instruct.Q4_1)."""
    path = os.path.normpath(ckpt)
    base = os.path.basename(path)
    return os.path.splitext(base)[0] if os.path.isfile(path) else base


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m tinyinfer.serve", formatter_class=HelpFormatter,
        description="Serve a checkpoint over the OpenAI API (POST /v1/completions, "
                    "/v1/chat/completions; GET /v1/models, /health, /metrics) and a chat page at /. "
                    "Needs the serve extra: pip install -e '.[serve]'.")
    p.add_argument("--ckpt", required=True,
                   help="checkpoint: a Hugging Face directory, one .safetensors file (config.json "
                        "beside it or in its metadata; tinyinfer's own INT4 files too), or a .gguf file")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (0: any free port, printed)")
    p.add_argument("--served-model-name", default=None,
                   help="the model name clients send and /v1/models lists (default: the checkpoint's "
                        "directory name, or its file name without the extension)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1/ endpoints (401 otherwise)")
    p.add_argument("--no-web", action="store_true",
                   help="leave out the chat page at / (by default / serves it: open the printed address)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGINT/SIGTERM, seconds running requests get to finish")
    # Defaults: serve/limits.py Limits (imported once the serve extra is known to be there).
    p.add_argument("--max-request-bytes", type=int, default=None,
                   help="largest request body in bytes (413 past it; default 16 MiB)")
    p.add_argument("--max-seqs-per-request", type=int, default=None,
                   help="prompts x n one request may queue (default 256)")
    p.add_argument("--template-timeout", type=float, default=None,
                   help="seconds a chat template may take to render (default 5; then a 400)")
    p.add_argument("--tool-call-parser", default=None, choices=sorted(FORMATS),
                   help="how tool calls are read from replies (hermes: <tool_call> tags, Qwen / Hermes; "
                        "llama3_json: Llama 3.x JSON); default: the format the chat template asks for, "
                        "if it names one (docs/tool-calls.md)")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"],
                   help="uvicorn's log level (info logs every request)")
    add_engine_arguments(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import uvicorn
        from tinyinfer.serve.app import build_app
        from tinyinfer.serve.limits import Limits
    except ImportError as err:
        print(f"error: the server needs its packages ({err}): pip install -e '.[serve]'", file=sys.stderr)
        return 2
    from tinyinfer.engine.llm_engine import LLMEngine
    from tinyinfer.engine.torchrun import launched
    try:
        given = dict(max_request_bytes=args.max_request_bytes, template_timeout_s=args.template_timeout,
                     max_seqs_per_request=args.max_seqs_per_request)
        limits = Limits(**{k: v for k, v in given.items() if v is not None}).check()
        launch = launched()                         # under torchrun only rank 0 serves
        sock = bind(args.host, args.port) if launch is None or launch.rank == 0 else None
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        apply_threads(args)
        engine = LLMEngine(args.ckpt, verbose=True, **engine_options(args))
    except (CheckpointError, ConfigError, ValueError, NotImplementedError, OSError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        if sock is not None:
            sock.close()
        return 2
    name = args.served_model_name or served_name(args.ckpt)
    app = build_app(engine, name, args.api_key, limits, web=not args.no_web,
                    tool_call_parser=args.tool_call_parser)
    config = uvicorn.Config(app, host=args.host, port=sock.getsockname()[1], log_level=args.log_level,
                            timeout_graceful_shutdown=args.shutdown_timeout, access_log=False)

    class Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.started:                        # listening now: say where (the real --port 0)
                port = self.servers[0].sockets[0].getsockname()[1]
                page = "" if args.no_web else f"; chat page: http://{args.host}:{port}/"
                print(f"tinyinfer: serving {name!r} at http://{args.host}:{port}/v1 ({engine.device}, "
                      f"{engine.blocks.num_blocks} KV blocks of {engine.block_size} tokens; chat "
                      f"template: {'yes' if engine.tokenizer.chat_template else 'none'}){page}",
                      file=sys.stderr, flush=True)

    server = Server(config)
    try:
        server.run(sockets=[sock])                                # returns after a graceful shutdown; uvicorn then
    except KeyboardInterrupt:                       # re-raises the signal: SIGTERM ends the process
        return 130                                  # as SIGTERM does, SIGINT arrives here
    finally:
        engine.close()                              # tensor parallelism: its workers stop now
    return 0


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads (uvicorn serves on it): a port in use is
    an `error:` line and exit 2, not uvicorn's log and exit 3."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port} ({err.strerror}): is another server running "
                      "there? Pick another --port (0: any free port)") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


if __name__ == "__main__":
    sys.exit(main())
