"""An upstream relay (smarthost) for e2e scenarios: aiosmtpd that requires STARTTLS and
AUTH, and stores each message it accepts as a file, prefixed with who authenticated.

Usage: smarthost.py --host IP --port P --cert C --key K --user U --password W --dir D
Prints "ready" once listening; runs until killed.
"""

import argparse
import os
import ssl
import threading
import time

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword


def main() -> None:
    p = argparse.ArgumentParser()
    for name in ("host", "cert", "key", "user", "password", "dir"):
        p.add_argument(f"--{name}", required=True)
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args()
    os.makedirs(args.dir, exist_ok=True)

    class Handler:
        async def handle_DATA(self, server, session, envelope):
            data = session.auth_data
            who = data.login.decode() if isinstance(data, LoginPassword) else "none"
            if not session.authenticated:
                who = "none"
            tls = "yes" if session.ssl else "no"
            name = os.path.join(args.dir, f"{time.time_ns()}.eml")
            with open(name + ".tmp", "wb") as f:
                f.write(f"X-Smarthost-Auth: {who}\r\nX-Smarthost-TLS: {tls}\r\n".encode())
                f.write(envelope.original_content)
            os.rename(name + ".tmp", name)
            return "250 2.0.0 stored by the smarthost"

    def authenticator(server, session, envelope, mechanism, auth_data):
        if (
            isinstance(auth_data, LoginPassword)
            and auth_data.login.decode() == args.user
            and auth_data.password.decode() == args.password
        ):
            return AuthResult(success=True, auth_data=auth_data)
        return AuthResult(success=False, handled=False)

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(args.cert, args.key)
    controller = Controller(
        Handler(),
        hostname=args.host,
        port=args.port,
        tls_context=ctx,
        require_starttls=True,
        auth_required=True,
        auth_require_tls=True,
        authenticator=authenticator,
    )
    controller.start()
    print("ready", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
