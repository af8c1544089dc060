"""Stand-alone pyftpdlib server process used by :func:`tests.servers.start_ftpd`.

Run as ``python tests/_ftpd.py --root DIR --user U --password P``. It binds to the given host
and port (port 0 picks a free one), prints ``READY <port>`` on stdout once it listens, and then
serves until it is terminated.
"""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and serve FTP forever."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--root", required=True)
    parser.add_argument("--user", required=True)
    parser.add_argument("--password", required=True)
    parser.add_argument("--buffer-size", type=int, default=1024 * 1024)
    parser.add_argument("--auth-failed-delay", type=float, default=0.0)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)

    from pyftpdlib.authorizers import DummyAuthorizer
    from pyftpdlib.handlers import DTPHandler, FTPHandler
    from pyftpdlib.log import config_logging
    from pyftpdlib.servers import FTPServer

    config_logging(level=getattr(logging, args.log_level.upper()))

    authorizer = DummyAuthorizer()  # no anonymous user is added: anonymous login is refused
    authorizer.add_user(args.user, args.password, args.root, perm="elradfmwMT")

    class FastDTPHandler(DTPHandler):
        ac_in_buffer_size = args.buffer_size
        ac_out_buffer_size = args.buffer_size

    class Handler(FTPHandler):
        banner = "trollmoves test FTP server ready."
        dtp_handler = FastDTPHandler
        auth_failed_timeout = args.auth_failed_delay
        use_sendfile = FTPHandler.use_sendfile

    Handler.authorizer = authorizer
    server = FTPServer((args.host, args.port), Handler)
    server.max_cons = 1024
    server.max_cons_per_ip = 0
    print(f"READY {server.address[1]}", flush=True)
    server.serve_forever(handle_exit=True)


if __name__ == "__main__":
    main(sys.argv[1:])
