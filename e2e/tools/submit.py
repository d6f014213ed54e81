#!/usr/bin/env python3
"""Submit mail to Herald the way a Python app does: stdlib smtplib, STARTTLS, AUTH PLAIN.

Usage: submit.py --server HOST --port PORT --user U --password P
                 --sender ADDR --to ADDR --marker TEXT [--oversize OCTETS]

Three submissions, each on its own connection, every server reply printed as it comes:

  good          a message from the sender's domain: 250 "queued as <id>"
  foreign-from  header From outside the account's domains: smtplib.SMTPDataError 550 5.7.1
  oversize      a message of OCTETS octets (above the server's SIZE): SMTPSenderRefused
                552 5.3.4 at MAIL, since smtplib declares SIZE= when the server offers it

The last line is `RESULT <json>` with each case's code, reply and exception. Exit status
0 when every case went as expected, 1 otherwise. The server's certificate is self-signed
in the tests, so it is not verified.
"""
import argparse
import json
import smtplib
import ssl
import sys
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY

CLIENT_NAME = "smtplib.client.test"  # never ask the resolver for this host's name


def say(case, what, code, text):
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    print(f"[{case}] {what}: {code} {text}", flush=True)


def connect(args, case):
    s = smtplib.SMTP(args.server, args.port, local_hostname=CLIENT_NAME, timeout=30)
    code, text = s.ehlo()
    say(case, "EHLO", code, text.splitlines()[0] if text else b"")
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    code, text = s.starttls(context=context)
    say(case, "STARTTLS", code, text)
    s.ehlo()
    s.user, s.password = args.user, args.password
    code, text = s.auth("PLAIN", s.auth_plain)
    say(case, "AUTH PLAIN", code, text)
    return s


def message(sender, to, subject, body):
    m = EmailMessage()
    m["From"] = sender
    m["To"] = to
    m["Subject"] = subject
    m.set_content(body)
    return m.as_bytes(policy=SMTP_POLICY)


def good(args):
    case = "good"
    s = connect(args, case)
    try:
        code, text = s.mail(args.sender)
        say(case, "MAIL", code, text)
        code, text = s.rcpt(args.to)
        say(case, "RCPT", code, text)
        code, text = s.data(message(args.sender, args.to, f"{args.marker} good", "Hello from smtplib.\n"))
        say(case, "DATA", code, text)
        text = text.decode("utf-8", "replace")
        return {"code": code, "reply": text, "ok": code == 250 and "queued as" in text}
    finally:
        s.quit()


def foreign_from(args):
    case = "foreign-from"
    s = connect(args, case)
    body = message("someone@foreign.test", args.to, f"{args.marker} foreign", "Not ours.\n")
    try:
        s.sendmail(args.sender, [args.to], body)
        say(case, "sendmail", 250, "accepted (unexpected)")
        return {"code": 250, "reply": "", "exception": None, "ok": False}
    except smtplib.SMTPDataError as e:
        say(case, "DATA", e.smtp_code, e.smtp_error)
        text = e.smtp_error.decode("utf-8", "replace")
        ok = e.smtp_code == 550 and text.startswith("5.7.1")
        return {"code": e.smtp_code, "reply": text, "exception": type(e).__name__, "ok": ok}
    finally:
        s.quit()


def oversize(args):
    case = "oversize"
    s = connect(args, case)
    line = "x" * 76 + "\n"
    body = message(args.sender, args.to, f"{args.marker} oversize", line * (args.oversize // len(line) + 1))
    try:
        s.sendmail(args.sender, [args.to], body)
        say(case, "sendmail", 250, "accepted (unexpected)")
        return {"code": 250, "reply": "", "exception": None, "ok": False}
    except smtplib.SMTPSenderRefused as e:
        say(case, "MAIL", e.smtp_code, e.smtp_error)
        text = e.smtp_error.decode("utf-8", "replace")
        ok = e.smtp_code == 552 and text.startswith("5.3.4")
        return {"code": e.smtp_code, "reply": text, "exception": type(e).__name__, "size": len(body), "ok": ok}
    except smtplib.SMTPException as e:
        say(case, "error", getattr(e, "smtp_code", 0), str(e))
        return {"code": getattr(e, "smtp_code", 0), "reply": str(e), "exception": type(e).__name__, "ok": False}
    finally:
        try:
            s.quit()
        except smtplib.SMTPException:
            pass


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in ("--server", "--user", "--password", "--sender", "--to", "--marker"):
        p.add_argument(name, required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--oversize", type=int, default=200_000)
    args = p.parse_args()
    results = {"good": good(args), "foreign-from": foreign_from(args), "oversize": oversize(args)}
    print("RESULT " + json.dumps(results), flush=True)
    return 0 if all(r["ok"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
