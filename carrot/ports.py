"""The port of a local server (`make ui`, `make dashboard`), checked before the server starts:
MLflow's and optuna-dashboard's servers print a traceback, or an error line, and exit 0 for a
port that is out of range or taken.

``python -m carrot.ports TARGET VARIABLE VALUE`` prints one line and exits 2 when VALUE cannot
be served on 127.0.0.1."""
from __future__ import annotations

import errno
import socket
import sys

HOST = "127.0.0.1"


def port_problem(text: str, host: str = HOST) -> str | None:
    """Why ``text`` is not a port a server here can listen on, or None."""
    try:
        port = int(text.strip())
    except ValueError:
        port = -1
    if not 1 <= port <= 65535:
        return "is not a port; expected an integer from 1 to 65535"
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return f"is in use on {host} (another server, perhaps an earlier one of these); expected a free port"
            if exc.errno == errno.EACCES:
                return "needs privileges this user does not have; expected a port from 1024"
            return f"cannot be opened on {host} ({exc.strerror or exc}); expected a free port"
    return None


def main(argv: list[str]) -> int:
    target, variable, value = argv
    problem = port_problem(value)
    if problem is None:
        return 0
    print(f"make {target}: {variable}={value} {problem}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
