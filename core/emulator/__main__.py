"""``python -m b24sms.emulator``: one emulated portal for manual runs against a local service."""

from __future__ import annotations

import argparse
import sys
import threading
from collections.abc import Sequence
from typing import TextIO

import requests

from .server import Emulator


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m b24sms.emulator",
        description="Run an emulated Bitrix24 portal (and its OAuth server) on 127.0.0.1.",
    )
    parser.add_argument("--app-url", help="the app's base URL, e.g. http://127.0.0.1:8000")
    parser.add_argument(
        "--install",
        choices=("event", "ui", "none"),
        default="event",
        help="how to install the app at start when --app-url is given",
    )
    parser.add_argument("--client-id", default="local.emulator")
    parser.add_argument("--client-secret", default="secret")
    parser.add_argument("--member-id", help="default: 32 random hex characters")
    parser.add_argument("--domain", help="default: 127.0.0.1:<portal port>")
    parser.add_argument("--oauth-port", type=int, default=0, help="default: a free port")
    parser.add_argument("--portal-port", type=int, default=0, help="default: a free port")
    parser.add_argument("--token-ttl", type=float, default=3600.0, help="seconds")
    parser.add_argument("--requests-per-second", type=float, default=2.0)
    parser.add_argument("--burst", type=float, default=50)
    return parser


def main(
    argv: Sequence[str] | None = None,
    *,
    stop: threading.Event | None = None,
    out: TextIO | None = None,
) -> int:
    """Run until Ctrl-C (or until ``stop`` is set, for tests). :returns: the exit status."""
    args = _parser().parse_args(argv)
    out = out or sys.stdout
    stop = stop or threading.Event()
    emulator = Emulator(
        client_id=args.client_id,
        client_secret=args.client_secret,
        token_ttl=args.token_ttl,
        requests_per_second=args.requests_per_second,
        burst=args.burst,
        port=args.oauth_port,
    )
    with emulator:
        portal = emulator.add_portal(
            domain=args.domain, member_id=args.member_id, port=args.portal_port
        )
        print(f"member_id:       {portal.member_id}", file=out)
        print(f"domain:          {portal.domain}", file=out)
        print(f"client_endpoint: {portal.client_endpoint}", file=out)
        print(f"oauth_url:       {emulator.oauth_url}", file=out)
        if args.app_url and args.install != "none":
            try:
                response = portal.install(args.app_url, mode=args.install)
                print(f"install ({args.install}): HTTP {response.status_code}", file=out)
            except requests.RequestException as exc:
                print(f"install ({args.install}) failed: {exc.__class__.__name__}", file=out)
        print("running; Ctrl-C stops", file=out, flush=True)
        try:
            # A bounded wait keeps Ctrl-C responsive.
            while not stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
