"""A recipient MX for e2e scenarios that records precisely what it saw: every connection,
command and message as a JSON line, so a scenario can check throttling (simultaneous
connections, messages per window, per source IP) and duplicates after the fact.

Usage: recording_mx.py --listen IP:PORT [--listen IP:PORT ...] --log FILE --control FILE
                       --dir DIR --hostname NAME
Prints "ready" once every listener accepts; runs until killed.

Log (one JSON object per line, flushed per line): t, ev, conn, peer, local and, per event,
  connect | refused {reply} | ehlo {name} | mail {from, args} | rcpt {to, reply}
  | data {from, rcpts, message_id, size, reply} | close

Control file (JSON, re-read when it changes; absent = defaults):
  greeting: "421 ..." refuses every new connection with that line;
  max_connections: N refuses connections beyond N open at once (421 4.7.0);
  rcpt: {"user@domain" or "@domain": "450 4.2.1 ..."};
  data_reply: "554 ..." answers every end of DATA with that line;
  data_delay: seconds to wait before answering end of DATA.
"""

import argparse
import asyncio
import email.parser
import json
import os
import time

from aiosmtpd.smtp import SMTP

TOO_MANY = "421 4.7.0 Too many connections"


class Control:
    """The control file, re-read only when it was replaced or rewritten. The key includes
    the inode and size besides mtime_ns so that a rewrite within one timestamp tick is
    still seen (the e2e harness also makes every write's mtime strictly increasing)."""

    def __init__(self, path):
        self.path = path
        self.key = None
        self.values = {}

    def get(self):
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self.key, self.values = None, {}
            return self.values
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        if key != self.key:
            try:
                with open(self.path, "rb") as f:
                    self.values = json.loads(f.read() or b"{}")
                self.key = key
            except (OSError, ValueError):
                # Caught mid-write by someone not using rename: keep the last good values
                # and look again next time.
                pass
        return self.values


class Recorder:
    """Shared state of all listeners: the log, the control file, the mail directory."""

    def __init__(self, log_path, control_path, mail_dir):
        self.log_file = open(log_path, "a", encoding="utf-8")
        self.control = Control(control_path)
        self.dir = mail_dir
        self.next_conn = 0
        self.open = 0
        self.last_name = 0

    def new_conn(self):
        self.next_conn += 1
        return self.next_conn

    def log(self, server, ev, **fields):
        record = {
            "t": time.time(),
            "ev": ev,
            "conn": server.conn,
            "peer": server.peer_ip,
            "local": server.local,
        }
        record.update(fields)
        self.log_file.write(json.dumps(record) + "\n")
        self.log_file.flush()

    def store(self, peer_ip, content):
        # time_ns may repeat between two messages within one clock tick.
        name_ns = max(time.time_ns(), self.last_name + 1)
        self.last_name = name_ns
        name = os.path.join(self.dir, f"{name_ns}.eml")
        with open(name + ".tmp", "wb") as f:
            f.write(f"X-Recording-Peer: {peer_ip}\r\n".encode())
            f.write(content)
        os.rename(name + ".tmp", name)


def reply_code(line):
    try:
        return int(line[:3])
    except (TypeError, ValueError):
        return 0


def message_id(content):
    headers = email.parser.BytesHeaderParser().parsebytes(content)
    value = headers.get("Message-ID")
    return " ".join(str(value).split()) if value is not None else None


class Handler:
    def __init__(self, recorder):
        self.rec = recorder

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        # With a 5-argument hook aiosmtpd leaves recording the name to the hook.
        session.host_name = hostname
        self.rec.log(server, "ehlo", name=hostname)
        return responses[:-1] + ["250-PIPELINING", "250-ENHANCEDSTATUSCODES", responses[-1]]

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        self.rec.log(server, "mail", **{"from": address, "args": mail_options})
        return "250 2.1.0 Ok"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        rules = self.rec.control.get().get("rcpt") or {}
        lower = address.lower()
        domain = "@" + lower.rpartition("@")[2]
        reply = None
        for key, line in rules.items():
            if key.lower() == lower:
                reply = line
                break
        if reply is None:
            reply = next((v for k, v in rules.items() if k.lower() == domain), None)
        if reply is None:
            reply = "250 2.1.5 Ok"
        code = reply_code(reply)
        if 200 <= code < 300:
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(rcpt_options)
        self.rec.log(server, "rcpt", to=address, reply=code)
        return reply

    async def handle_DATA(self, server, session, envelope):
        control = self.rec.control.get()
        delay = float(control.get("data_delay") or 0)
        if delay > 0:
            # A client that goes away meanwhile cancels this coroutine: nothing is stored,
            # as with a real MTA that had not committed the message yet.
            await asyncio.sleep(delay)
        reply = control.get("data_reply") or "250 2.0.0 Ok: stored"
        code = reply_code(reply)
        content = envelope.original_content or b""
        if 200 <= code < 300:
            self.rec.store(server.peer_ip, content)
        self.rec.log(
            server,
            "data",
            **{
                "from": envelope.mail_from,
                "rcpts": list(envelope.rcpt_tos),
                "message_id": message_id(content),
                "size": len(content),
                "reply": code,
            },
        )
        return reply


class RecordingSMTP(SMTP):
    """aiosmtpd's SMTP with a connection id, connect/close records, and a greeting that
    the control file can turn into a refusal."""

    def __init__(self, recorder, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rec = recorder
        self.conn = 0
        self.peer_ip = ""
        self.local = ""
        self.refusal = None
        self.closed = False

    def connection_made(self, transport):
        if self.transport is None:
            # A new TCP connection (not the re-entry after STARTTLS, unused here).
            self.conn = self.rec.new_conn()
            peer = transport.get_extra_info("peername")
            sock = transport.get_extra_info("sockname")
            self.peer_ip = peer[0] if peer else ""
            self.local = f"{sock[0]}:{sock[1]}" if sock else ""
            self.rec.open += 1
            self.rec.log(self, "connect")
            control = self.rec.control.get()
            limit = control.get("max_connections")
            if control.get("greeting"):
                self.refusal = control["greeting"]
            elif limit is not None and self.rec.open > int(limit):
                self.refusal = TOO_MANY
        super().connection_made(transport)

    async def _handle_client(self):
        if self.refusal is None:
            return await super()._handle_client()
        self.rec.log(self, "refused", reply=self.refusal)
        try:
            await self.push(self.refusal)
        finally:
            if self.transport is not None:
                self.transport.close()

    def connection_lost(self, error):
        if not self.closed:
            self.closed = True
            self.rec.open -= 1
            self.rec.log(self, "close")
        super().connection_lost(error)


def parse_listen(value):
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        raise argparse.ArgumentTypeError(f"expected IP:PORT, got {value!r}")
    return host.strip("[]"), int(port)


async def serve(args):
    os.makedirs(args.dir, exist_ok=True)
    recorder = Recorder(args.log, args.control, args.dir)
    handler = Handler(recorder)
    loop = asyncio.get_running_loop()

    def factory():
        return RecordingSMTP(
            recorder,
            handler,
            hostname=args.hostname,
            ident="ESMTP recording-mx",
            loop=loop,
        )

    servers = [await loop.create_server(factory, host=h, port=p) for h, p in args.listen]
    print("ready", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        for s in servers:
            s.close()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--listen", type=parse_listen, action="append", required=True)
    for name in ("log", "control", "dir", "hostname"):
        p.add_argument(f"--{name}", required=True)
    asyncio.run(serve(p.parse_args()))


if __name__ == "__main__":
    main()
