"""OpenAI-compatible HTTP server: protocol schemas, the engine thread bridge, the FastAPI app."""

from .app import ServerConfig, create_app
from .serve import add_serve_arguments, run_server, serve_from_args

__all__ = ["ServerConfig", "add_serve_arguments", "create_app", "run_server", "serve_from_args"]
