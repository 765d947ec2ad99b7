"""python -m server --models DIR [...]: settings, logging, then serve(). See docs/server.md."""

from __future__ import annotations

import asyncio
import logging
import sys

from .config import load_settings


def main(argv: list[str] | None = None) -> int:
    settings = load_settings(argv)
    # Logging first: the heavy imports below (ONNX Runtime, gRPC) and model loading already log.
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    log = logging.getLogger("server")
    from .app import serve
    from .errors import StartupError

    try:
        return asyncio.run(serve(settings))
    except StartupError as exc:
        log.error("cannot start: %s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
