#!/usr/bin/env python3
"""A local DynamoDB-compatible server for the tests: moto's server mode, with
every request handled one at a time.

moto's own `moto_server` serves requests on several threads without locking
its tables, so two concurrent conditional writes can both pass their
condition; real DynamoDB never lets that happen. Serialising requests makes
the emulator honour what the store relies on (atomic conditional writes and
transactions) while keeping HTTP keep-alive.

usage: dynamodb-server.py --host 127.0.0.1 --port PORT
"""

import argparse
import signal
import sys
import threading

from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from werkzeug.serving import run_simple


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    app = DomainDispatcherApplication(create_backend_app)
    lock = threading.Lock()

    def serialised(environ, start_response):
        with lock:
            return list(app(environ, start_response))

    run_simple(
        args.host,
        args.port,
        serialised,
        threaded=True,
        request_handler=MotoRequestHandler,
    )


if __name__ == "__main__":
    main()
