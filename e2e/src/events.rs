//! Herald's outcome events (`HERALD_EVENTS`, one protobuf `herald.v1.Event` per message),
//! read back from a scenario's nats-server.
//!
//! This crate stays black-box and depends on no Herald crate, nor on a NATS or protobuf
//! client: the JetStream API is plain request/reply over the NATS text protocol, and
//! `Event` is a handful of scalar and string fields. So both are done here on `std` and
//! serde_json, and [`Event`] mirrors `proto/herald/v1/queue.proto` (the unit tests pin
//! the field numbers).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Value, json};

/// The stream every outcome goes to.
pub const EVENTS_STREAM: &str = "HERALD_EVENTS";

const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Where the JetStream API's replies come back; one connection per call, so fixed.
const INBOX: &str = "_INBOX.herald_e2e_events";

/// `herald.v1.EventKind`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EventKind {
    Unspecified,
    Received,
    Delivered,
    Deferred,
    Bounced,
    Failed,
    Suppressed,
    Expired,
    Delayed,
    /// A number this mirror does not know (a newer Herald).
    Other(i32),
}

impl EventKind {
    pub fn from_i32(n: i32) -> EventKind {
        match n {
            0 => EventKind::Unspecified,
            1 => EventKind::Received,
            2 => EventKind::Delivered,
            3 => EventKind::Deferred,
            4 => EventKind::Bounced,
            5 => EventKind::Failed,
            6 => EventKind::Suppressed,
            7 => EventKind::Expired,
            8 => EventKind::Delayed,
            n => EventKind::Other(n),
        }
    }

    /// The last token of the event's subject, as Herald spells it.
    pub fn word(self) -> &'static str {
        match self {
            EventKind::Unspecified => "unspecified",
            EventKind::Received => "received",
            EventKind::Delivered => "delivered",
            EventKind::Deferred => "deferred",
            EventKind::Bounced => "bounced",
            EventKind::Failed => "failed",
            EventKind::Suppressed => "suppressed",
            EventKind::Expired => "expired",
            EventKind::Delayed => "delayed",
            EventKind::Other(_) => "other",
        }
    }
}

/// `herald.v1.Event`, plus where it sat in the stream.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    pub kind: EventKind,
    pub queue_id: String,
    pub account: String,
    pub sender: String,
    pub recipients: Vec<String>,
    pub domain: String,
    pub remote_host: String,
    pub reply_code: u32,
    pub enhanced_code: String,
    pub reply_text: String,
    pub attempt: u32,
    /// Unix seconds.
    pub at: i64,
    pub message_id: String,
    pub size: u64,
    pub source_ip: String,
    pub tls: bool,
    pub bounce_class: String,
    pub duration_ms: u64,
    pub site: String,
    /// `herald.events.<account>.<kind>`.
    pub subject: String,
    /// Stream sequence number: the order events were recorded in.
    pub seq: u64,
}

impl Event {
    /// Decodes the protobuf bytes of one event (unknown fields are skipped, as protobuf
    /// readers must).
    pub fn decode(bytes: &[u8]) -> Result<Event, String> {
        let mut e = Event {
            kind: EventKind::Unspecified,
            queue_id: String::new(),
            account: String::new(),
            sender: String::new(),
            recipients: Vec::new(),
            domain: String::new(),
            remote_host: String::new(),
            reply_code: 0,
            enhanced_code: String::new(),
            reply_text: String::new(),
            attempt: 0,
            at: 0,
            message_id: String::new(),
            size: 0,
            source_ip: String::new(),
            tls: false,
            bounce_class: String::new(),
            duration_ms: 0,
            site: String::new(),
            subject: String::new(),
            seq: 0,
        };
        let mut r = Reader { buf: bytes, pos: 0 };
        while !r.done() {
            let key = r.varint()?;
            let (field, wire) = (key >> 3, key & 7);
            match (field, wire) {
                (1, 0) => e.kind = EventKind::from_i32(r.varint()? as i32),
                (2, 2) => e.queue_id = r.string()?,
                (3, 2) => e.account = r.string()?,
                (4, 2) => e.sender = r.string()?,
                (5, 2) => e.recipients.push(r.string()?),
                (6, 2) => e.domain = r.string()?,
                (7, 2) => e.remote_host = r.string()?,
                (8, 0) => e.reply_code = r.varint()? as u32,
                (9, 2) => e.enhanced_code = r.string()?,
                (10, 2) => e.reply_text = r.string()?,
                (11, 0) => e.attempt = r.varint()? as u32,
                // int64: negative numbers are ten-byte two's complement varints.
                (12, 0) => e.at = r.varint()? as i64,
                (13, 2) => e.message_id = r.string()?,
                (14, 0) => e.size = r.varint()?,
                (15, 2) => e.source_ip = r.string()?,
                (16, 0) => e.tls = r.varint()? != 0,
                (17, 2) => e.bounce_class = r.string()?,
                (18, 0) => e.duration_ms = r.varint()?,
                (19, 2) => e.site = r.string()?,
                (_, wire) => r.skip(wire)?,
            }
        }
        Ok(e)
    }
}

/// The protobuf wire format, as far as `Event` needs it.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn done(&self) -> bool {
        self.pos >= self.buf.len()
    }

    fn varint(&mut self) -> Result<u64, String> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *self
                .buf
                .get(self.pos)
                .ok_or_else(|| format!("varint cut off at byte {}", self.pos))?;
            self.pos += 1;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(format!("varint longer than 10 bytes before {}", self.pos))
    }

    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&end| end <= self.buf.len())
            .ok_or_else(|| format!("{n} bytes at {} run past the end", self.pos))?;
        let out = &self.buf[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn string(&mut self) -> Result<String, String> {
        let len = self.varint()? as usize;
        let at = self.pos;
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|e| format!("string at {at}: {e}"))
    }

    fn skip(&mut self, wire: u64) -> Result<(), String> {
        match wire {
            0 => self.varint().map(drop),
            1 => self.take(8).map(drop),
            2 => {
                let len = self.varint()? as usize;
                self.take(len).map(drop)
            }
            5 => self.take(4).map(drop),
            w => Err(format!("wire type {w} at {}", self.pos)),
        }
    }
}

/// Every event in `HERALD_EVENTS` of the nats-server at `nats_url`
/// (`nats://127.0.0.1:PORT`), in stream order; empty while the stream does not exist yet.
/// Panics (with the reason) when the server cannot be read.
pub fn events(nats_url: &str) -> Vec<Event> {
    try_events(nats_url).unwrap_or_else(|e| panic!("read {EVENTS_STREAM} at {nats_url}: {e}"))
}

/// [`events`] without the panic.
pub fn try_events(nats_url: &str) -> Result<Vec<Event>, String> {
    let mut nats = Conn::connect(nats_url)?;
    let mut out = Vec::new();
    let mut next = 1u64;
    loop {
        // `next_by_subj` returns the first message at or after `seq`, so deleted or
        // expired sequence numbers are stepped over without asking for each one.
        let reply = nats.request(
            &format!("$JS.API.STREAM.MSG.GET.{EVENTS_STREAM}"),
            &json!({"seq": next, "next_by_subj": "herald.events.>"}),
        )?;
        if let Some(err) = reply.get("error") {
            let code = err.get("code").and_then(Value::as_u64);
            // 404: no such stream (nothing published yet) or no message from `next` on.
            if code == Some(404) {
                return Ok(out);
            }
            return Err(format!("JetStream API error: {err}"));
        }
        let msg = reply
            .get("message")
            .ok_or_else(|| format!("no message in {reply}"))?;
        let seq = msg
            .get("seq")
            .and_then(Value::as_u64)
            .ok_or_else(|| format!("no seq in {msg}"))?;
        let subject = msg.get("subject").and_then(Value::as_str).unwrap_or("");
        let data = msg.get("data").and_then(Value::as_str).unwrap_or("");
        let bytes = B64
            .decode(data)
            .map_err(|e| format!("message {seq}: data is not base64: {e}"))?;
        let mut event =
            Event::decode(&bytes).map_err(|e| format!("message {seq} ({subject}): {e}"))?;
        event.subject = subject.to_string();
        event.seq = seq;
        out.push(event);
        next = seq + 1;
    }
}

/// One NATS client connection that makes requests one at a time.
struct Conn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    next_request: u64,
}

impl Conn {
    fn connect(url: &str) -> Result<Conn, String> {
        let hostport = url
            .strip_prefix("nats://")
            .unwrap_or(url)
            .trim_end_matches('/');
        let addr: SocketAddr = hostport
            .to_socket_addrs()
            .map_err(|e| format!("address {hostport}: {e}"))?
            .next()
            .ok_or_else(|| format!("{hostport} resolves to nothing"))?;
        let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
            .map_err(|e| format!("connect {addr}: {e}"))?;
        stream
            .set_read_timeout(Some(IO_TIMEOUT))
            .and_then(|()| stream.set_write_timeout(Some(IO_TIMEOUT)))
            .map_err(|e| format!("socket timeouts: {e}"))?;
        let writer = stream
            .try_clone()
            .map_err(|e| format!("clone socket: {e}"))?;
        let mut conn = Conn {
            reader: BufReader::new(stream),
            writer,
            next_request: 0,
        };
        let info = conn.line()?;
        if !info.starts_with("INFO ") {
            return Err(format!("expected INFO, got {info:?}"));
        }
        // Headers and no_responders: a request nobody answers (JetStream off) fails at
        // once with a 503 status instead of running into the read timeout.
        let connect = json!({
            "verbose": false,
            "pedantic": false,
            "lang": "herald-e2e",
            "version": "0",
            "protocol": 1,
            "headers": true,
            "no_responders": true,
        });
        conn.write(format!("CONNECT {connect}\r\nSUB {INBOX}.* 1\r\nPING\r\n").as_bytes())?;
        loop {
            match conn.line()?.as_str() {
                "PONG" => return Ok(conn),
                "PING" => conn.write(b"PONG\r\n")?,
                "+OK" => {}
                // The server may send its INFO again at any time (here: once CONNECT is in).
                info if info.starts_with("INFO ") => {}
                other => return Err(format!("CONNECT refused: {other}")),
            }
        }
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.writer
            .write_all(bytes)
            .map_err(|e| format!("write to NATS: {e}"))
    }

    fn line(&mut self) -> Result<String, String> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Err("NATS closed the connection".to_string()),
            Ok(_) => Ok(line.trim_end_matches(['\r', '\n']).to_string()),
            Err(e) => Err(format!("read from NATS: {e}")),
        }
    }

    fn payload(&mut self, len: usize) -> Result<Vec<u8>, String> {
        // The payload and its CRLF.
        let mut buf = vec![0; len + 2];
        self.reader
            .read_exact(&mut buf)
            .map_err(|e| format!("read {len} payload bytes from NATS: {e}"))?;
        buf.truncate(len);
        Ok(buf)
    }

    /// Publishes `body` to `subject` and returns the JSON reply.
    fn request(&mut self, subject: &str, body: &Value) -> Result<Value, String> {
        self.next_request += 1;
        let reply_to = format!("{INBOX}.{}", self.next_request);
        let payload = body.to_string();
        self.write(
            format!(
                "PUB {subject} {reply_to} {}\r\n{payload}\r\n",
                payload.len()
            )
            .as_bytes(),
        )?;
        loop {
            let line = self.line()?;
            let parts: Vec<&str> = line.split_whitespace().collect();
            match parts.first().copied() {
                Some("PING") => self.write(b"PONG\r\n")?,
                Some("+OK") | Some("PONG") | Some("INFO") => {}
                Some("-ERR") => return Err(format!("NATS: {line}")),
                // MSG <subject> <sid> [reply-to] <#bytes>
                Some("MSG") if parts.len() >= 4 => {
                    let len = parse_len(parts[parts.len() - 1], &line)?;
                    let data = self.payload(len)?;
                    if parts[1] != reply_to {
                        continue; // a late answer to an earlier request
                    }
                    return serde_json::from_slice(&data).map_err(|e| {
                        format!(
                            "reply is not JSON ({e}): {}",
                            String::from_utf8_lossy(&data)
                        )
                    });
                }
                // HMSG <subject> <sid> [reply-to] <#header bytes> <#total bytes>
                Some("HMSG") if parts.len() >= 5 => {
                    let header_len = parse_len(parts[parts.len() - 2], &line)?;
                    let len = parse_len(parts[parts.len() - 1], &line)?;
                    let data = self.payload(len)?;
                    if parts[1] != reply_to {
                        continue;
                    }
                    let (headers, body) = data.split_at(header_len.min(data.len()));
                    let status = String::from_utf8_lossy(headers);
                    let first = status.lines().next().unwrap_or("");
                    if first.contains(" 503") {
                        return Err(format!("no responders for {subject}: is JetStream on?"));
                    }
                    return serde_json::from_slice(body)
                        .map_err(|e| format!("reply is not JSON ({e}): {status}"));
                }
                _ => return Err(format!("unexpected line from NATS: {line:?}")),
            }
        }
    }
}

fn parse_len(token: &str, line: &str) -> Result<usize, String> {
    token
        .parse()
        .map_err(|e| format!("bad length {token:?} in {line:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn varint(mut v: u64, out: &mut Vec<u8>) {
        loop {
            let byte = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }

    fn int_field(field: u64, v: u64, out: &mut Vec<u8>) {
        varint(field << 3, out);
        varint(v, out);
    }

    fn str_field(field: u64, s: &str, out: &mut Vec<u8>) {
        varint(field << 3 | 2, out);
        varint(s.len() as u64, out);
        out.extend_from_slice(s.as_bytes());
    }

    #[test]
    fn decodes_every_field_by_its_proto_number() {
        let mut b = Vec::new();
        int_field(1, 3, &mut b);
        str_field(2, "Q1", &mut b);
        str_field(3, "default/app", &mut b);
        str_field(4, "s@example.test", &mut b);
        str_field(5, "a@dest.test", &mut b);
        str_field(5, "b@dest.test", &mut b);
        str_field(6, "dest.test", &mut b);
        str_field(7, "mx.dest.test[127.1.2.3]", &mut b);
        int_field(8, 450, &mut b);
        str_field(9, "4.2.1", &mut b);
        str_field(10, "450 4.2.1 busy", &mut b);
        int_field(11, 2, &mut b);
        int_field(12, 1_800_000_000, &mut b);
        str_field(13, "<m@x>", &mut b);
        int_field(14, 1234, &mut b);
        str_field(15, "127.0.0.1", &mut b);
        int_field(16, 1, &mut b);
        str_field(17, "hard", &mut b);
        int_field(18, 87, &mut b);
        str_field(19, "mx.dest.test", &mut b);
        // Fields this mirror does not know, of each wire type, are skipped.
        int_field(40, 7, &mut b);
        varint(41 << 3 | 1, &mut b);
        b.extend_from_slice(&[0; 8]);
        str_field(42, "later", &mut b);
        varint(43 << 3 | 5, &mut b);
        b.extend_from_slice(&[0; 4]);
        let e = Event::decode(&b).expect("decodes");
        assert_eq!(e.kind, EventKind::Deferred);
        assert_eq!(e.queue_id, "Q1");
        assert_eq!(e.account, "default/app");
        assert_eq!(e.sender, "s@example.test");
        assert_eq!(e.recipients, ["a@dest.test", "b@dest.test"]);
        assert_eq!(e.domain, "dest.test");
        assert_eq!(e.remote_host, "mx.dest.test[127.1.2.3]");
        assert_eq!(e.reply_code, 450);
        assert_eq!(e.enhanced_code, "4.2.1");
        assert_eq!(e.reply_text, "450 4.2.1 busy");
        assert_eq!(e.attempt, 2);
        assert_eq!(e.at, 1_800_000_000);
        assert_eq!(e.message_id, "<m@x>");
        assert_eq!(e.size, 1234);
        assert_eq!(e.source_ip, "127.0.0.1");
        assert!(e.tls);
        assert_eq!(e.bounce_class, "hard");
        assert_eq!(e.duration_ms, 87);
        assert_eq!(e.site, "mx.dest.test");
    }

    #[test]
    fn negative_int64_and_damaged_input() {
        let mut b = Vec::new();
        int_field(12, -5i64 as u64, &mut b);
        assert_eq!(Event::decode(&b).expect("decodes").at, -5);
        assert_eq!(
            Event::decode(&[]).expect("empty is all defaults").kind,
            EventKind::Unspecified
        );
        let mut cut = Vec::new();
        str_field(2, "queue-id", &mut cut);
        cut.truncate(5);
        assert!(Event::decode(&cut).is_err());
        assert!(Event::decode(&[0x08, 0x80]).is_err(), "varint cut off");
        assert!(
            Event::decode(&[0x0b]).is_err(),
            "group wire types are not used"
        );
    }

    #[test]
    fn kind_words_match_the_subjects() {
        assert_eq!(EventKind::from_i32(2).word(), "delivered");
        assert_eq!(EventKind::from_i32(8), EventKind::Delayed);
        assert_eq!(EventKind::from_i32(99), EventKind::Other(99));
    }
}
