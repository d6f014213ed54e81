#!/usr/bin/env python3
"""Verify every DKIM-Signature of the message on stdin, independently of Herald.

Usage: dkim_verify.py --dns 127.0.0.1:PORT < message

Public keys are fetched (TXT) from the given nameserver only, never from the
system resolver. Prints one line per signature:

    sig 0 d=example.test s=herald a=rsa-sha256 ok
    sig 1 d=example.test s=herald-ed25519 a=ed25519-sha256 FAIL body hash mismatch (...)

Exit status: 0 if there is at least one signature and all of them verify,
1 if any signature fails or there is none, 2 on usage errors.
"""
import argparse
import logging
import sys

import dkim
import dns.exception
import dns.resolver
from dkim.util import parse_tag_value


class Collect(logging.Handler):
    """Keeps what dkimpy logs about a verification, to explain a failure."""

    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.errors = []
        self.debug = []

    def emit(self, record):
        msg = record.getMessage()
        (self.errors if record.levelno >= logging.WARNING else self.debug).append(msg)


def make_dnsfunc(host, port):
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [host]
    resolver.port = port
    resolver.timeout = 3
    resolver.lifetime = 5

    def dnsfunc(name, timeout=5):
        if isinstance(name, bytes):
            name = name.decode("utf-8")
        try:
            answer = resolver.resolve(name, "TXT", raise_on_no_answer=False, lifetime=timeout)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoNameservers):
            return None
        except dns.exception.Timeout as e:
            raise dkim.DnsTimeoutError(str(e))
        for rrset in answer.response.answer:
            if rrset.rdtype == dns.rdatatype.TXT:
                # One record, its character-strings concatenated (RFC 6376 3.6.2.2).
                return b"".join(list(rrset.items)[0].strings)
        return None

    return dnsfunc


def tag(fields, name):
    value = fields.get(name.encode())
    return value.decode("utf-8", "replace") if value is not None else "?"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dns", required=True, help="HOST:PORT of the test nameserver")
    args = ap.parse_args()
    host, _, port = args.dns.rpartition(":")
    if not host or not port.isdigit():
        print("--dns must be HOST:PORT", file=sys.stderr)
        return 2
    dnsfunc = make_dnsfunc(host, int(port))

    message = sys.stdin.buffer.read()
    try:
        headers, _body = dkim.rfc822_parse(message)
    except Exception as e:  # noqa: BLE001 - report anything as a failure
        print("message does not parse: %s" % e)
        return 1
    sigs = [v for (k, v) in headers if k.lower() == b"dkim-signature"]
    if not sigs:
        print("no DKIM-Signature header")
        return 1

    all_ok = True
    for idx, raw in enumerate(sigs):
        try:
            fields = parse_tag_value(raw)
        except Exception:  # noqa: BLE001
            fields = {}
        desc = "sig %d d=%s s=%s a=%s" % (idx, tag(fields, "d"), tag(fields, "s"), tag(fields, "a"))
        collect = Collect()
        logger = logging.getLogger("dkim_verify.%d" % idx)
        logger.setLevel(logging.DEBUG)
        logger.propagate = False
        logger.addHandler(collect)
        try:
            ok = dkim.DKIM(message, logger=logger).verify(idx=idx, dnsfunc=dnsfunc)
            reason = "; ".join(collect.errors) or "signature does not verify"
        except Exception as e:  # noqa: BLE001 - dkimpy raises several kinds
            ok = False
            reason = "%s: %s" % (type(e).__name__, e)
        if ok:
            print("%s ok" % desc)
        else:
            all_ok = False
            print("%s FAIL %s" % (desc, reason))
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
