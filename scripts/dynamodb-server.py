#!/usr/bin/env python3
"""A local DynamoDB-compatible server for the tests: moto's server mode, with
every request handled one at a time.

moto's own `moto_server` serves requests on several threads without locking
its tables, so two concurrent conditional writes can both pass their
condition; real DynamoDB never lets that happen. Serialising requests makes
the emulator honour what the store relies on (atomic conditional writes and
transactions) while keeping HTTP keep-alive.

moto also snapshots a whole table with copy.deepcopy for every item of a
TransactWriteItems (to roll back on failure), which makes a transaction cost
grow with the table: about 30/s on an empty table, 7/s at 600 items. For
transactions made only of Put and ConditionCheck (all the service uses), a
snapshot of the table's item mapping restores the same state on rollback, as
a Put replaces an item object and never changes it in place. Other
transactions keep moto's deep copy.

usage: dynamodb-server.py --host 127.0.0.1 --port PORT
"""

import argparse
import copy
import signal
import sys
import threading
from collections import defaultdict

import moto.dynamodb.models as dynamodb_models
from moto.dynamodb.models.table import Table
from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from werkzeug.serving import run_simple


class _TableSnapshots:
    """Stands in for the `copy` module inside moto's DynamoDB backend."""

    fast = False

    @staticmethod
    def deepcopy(obj, *args, **kwargs):
        if _TableSnapshots.fast and isinstance(obj, Table):
            snapshot = copy.copy(obj)
            snapshot.items = defaultdict(
                dict,
                {h: (dict(r) if isinstance(r, dict) else r) for h, r in obj.items.items()},
            )
            return snapshot
        return copy.deepcopy(obj, *args, **kwargs)

    copy = staticmethod(copy.copy)


def _install_fast_snapshots() -> None:
    original = dynamodb_models.DynamoDBBackend.transact_write_items

    def transact_write_items(self, transact_items):
        _TableSnapshots.fast = all(
            next(iter(item)) in ("Put", "ConditionCheck") for item in transact_items
        )
        try:
            return original(self, transact_items)
        finally:
            _TableSnapshots.fast = False

    dynamodb_models.copy = _TableSnapshots
    dynamodb_models.DynamoDBBackend.transact_write_items = transact_write_items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    _install_fast_snapshots()
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
