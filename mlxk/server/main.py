"""Run the api in the foreground under uvicorn (what `mlxk serve` does).

uvicorn turns SIGINT/SIGTERM into a graceful shutdown; the app's lifespan then stops the inference worker it
started, so no child keeps the port or the socket.
"""
from __future__ import annotations

import ipaddress
import logging
import sys

from mlxk.errors import ConfigError
from mlxk.server.deps import ServerConfig

log = logging.getLogger("mlxk.server.main")

GRACEFUL_SHUTDOWN_S = 5


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(config: ServerConfig) -> None:
    """Anything but loopback exposes the models to the network: refuse it without an API key."""
    if not is_loopback(config.host) and not config.api_key:
        raise ConfigError(
            f"refusing to listen on {config.host} without an API key: anyone on the network could use the "
            "server. Pass --api-key KEY (or set MLXK_API_KEY), or bind 127.0.0.1.",
            host=config.host,
        )


def run_server(config: ServerConfig, *, log_level: str = "info") -> None:
    import uvicorn

    from mlxk.server.app import create_app

    check_bind(config)
    logging.basicConfig(level=log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uv_config = uvicorn.Config(create_app(config), host=config.host, port=config.port, log_level=log_level,
                               access_log=False, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S, lifespan="on")
    server = uvicorn.Server(uv_config)
    log.info("mlxk serving on http://%s:%s (inference socket %s)", config.host, config.port,
             config.settings.inference_socket)
    server.run()
    if not server.started:
        raise ConfigError(f"the server could not start on {config.host}:{config.port} (is the port in use?); "
                          "see the messages above")
