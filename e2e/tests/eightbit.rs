//! 8-bit mail to an MX without 8BITMIME (RFC 6152 §3): Postfix's smtp-sink started with
//! `-8` is the MX of `old.test`, and what it dumps must be 7-bit MIME — text parts
//! quoted-printable, the rest base64, no `BODY=8BITMIME` — that decodes (with Python's
//! `email` package) to what the app sent and carries a DKIM signature that dkimpy verifies
//! over the converted bytes. The control: the same messages to `new.test`, whose recording
//! MX (aiosmtpd) announces 8BITMIME, arrive with `BODY=8BITMIME` and a body unchanged to
//! the byte.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use herald_e2e::{
    EventKind, Fleet, FleetOptions, Scenario, dkim_signatures, dkim_verify, events, find_tool,
    header_values, require_netns, venv_dir, wait_until,
};
use serde_json::Value;

const SENDER: &str = "sender@example.test";
/// Its MX is smtp-sink without 8BITMIME.
const OLD: &str = "user@old.test";
/// Its MX is the recording MX, with 8BITMIME.
const NEW: &str = "user@new.test";

/// Text with 8-bit UTF-8 in every shape quoted-printable has to deal with: 2-, 3- and
/// 4-byte sequences, a line longer than 76 octets (soft line breaks), `=`, a tab, and
/// trailing white space (which QP must protect).
const TEXT: &str = "Grüße aus Köln, naïve café — 100 € = 1 Stück.\r\n\
    日本語のテキストと絵文字 🎉📬 in einer Zeile.\r\n\
    Eine sehr lange Zeile mit Umlauten äöüÄÖÜß, die weit über sechsundsiebzig Oktette \
    hinausgeht, damit weiche Zeilenumbrüche nötig sind: Ende.\r\n\
    \tTabulator vorn, Leerzeichen hinten   \r\n\
    Letzte Zeile.\r\n";

/// The attachment: every byte from 0x80 to 0xFF and printable ASCII, in CRLF lines (an
/// 8bit body may hold no NUL and no bare CR or LF).
fn attachment() -> Vec<u8> {
    let mut out = Vec::new();
    for i in 0..6u8 {
        if i > 0 {
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(format!("line {i}: ").as_bytes());
        out.extend((0x80u8..=0xff).rev().skip(usize::from(i) * 7));
        out.extend_from_slice(b" =?= tail");
    }
    out
}

/// The single-part message as submitted (before dot-stuffing, which it does not need).
fn text_message(message_id: &str) -> Vec<u8> {
    format!(
        "From: {SENDER}\r\nTo: {OLD}, {NEW}\r\nSubject: eightbit text\r\n\
         Message-ID: {message_id}\r\nMIME-Version: 1.0\r\n\
         Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\
         \r\n{TEXT}"
    )
    .into_bytes()
}

/// multipart/mixed declared 8bit as a whole (which the conversion must relabel 7bit),
/// with an 8-bit text part and an 8-bit application/octet-stream attachment.
fn multipart_message(message_id: &str) -> Vec<u8> {
    let boundary = "=-herald-e2e-boundary-8bit";
    let mut m = format!(
        "From: {SENDER}\r\nTo: {OLD}, {NEW}\r\nSubject: eightbit multipart\r\n\
         Message-ID: {message_id}\r\nMIME-Version: 1.0\r\n\
         Content-Type: multipart/mixed; boundary=\"{boundary}\"\r\n\
         Content-Transfer-Encoding: 8bit\r\n\
         \r\nThis is a multi-part message in MIME format.\r\n\
         --{boundary}\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Transfer-Encoding: 8bit\r\n\r\n{TEXT}\r\n\
         --{boundary}\r\nContent-Type: application/octet-stream\r\n\
         Content-Disposition: attachment; filename=\"bytes.bin\"\r\n\
         Content-Transfer-Encoding: 8bit\r\n\r\n"
    )
    .into_bytes();
    m.extend_from_slice(&attachment());
    m.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    m
}

/// `smtp-sink -8` (no 8BITMIME) dumping every transaction to its own file, killed on drop.
struct SmtpSink {
    child: Child,
    addr: SocketAddr,
    dir: PathBuf,
    log: PathBuf,
}

impl SmtpSink {
    fn start(scenario: &Scenario, ip: Ipv4Addr) -> SmtpSink {
        let dir = scenario.subdir("sink");
        // It writes as nobody (-u) once it has bound port 25.
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777))
            .expect("chmod the sink's dump dir");
        let addr = SocketAddr::from((ip, 25));
        let log = scenario.dir().join("smtp-sink.log");
        let out = File::create(&log).expect("create the smtp-sink log");
        let err = out.try_clone().expect("dup the smtp-sink log");
        let child = Command::new(find_tool("smtp-sink", &[]))
            .args(["-4", "-8", "-u", "nobody", "-h", "mx.old.test", "-d"])
            .arg(format!("{}/%Y%m%d%H%M%S.", dir.display()))
            .arg(addr.to_string())
            .arg("100")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("spawn smtp-sink");
        let mut sink = SmtpSink {
            child,
            addr,
            dir,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_err() {
            let exited = sink.child.try_wait().ok().flatten();
            if exited.is_some() || Instant::now() > deadline {
                panic!(
                    "smtp-sink did not start on {addr} ({exited:?}):\n{}",
                    std::fs::read_to_string(&sink.log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        sink
    }

    /// Every dump file's bytes, by name (one per transaction).
    fn dumps(&self) -> BTreeMap<PathBuf, Vec<u8>> {
        std::fs::read_dir(&self.dir)
            .expect("list the sink's dump dir")
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_file())
            .map(|p| {
                let bytes = std::fs::read(&p).expect("read a sink dump");
                (p, bytes)
            })
            .collect()
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One smtp-sink dump split up: its own `X-...` records and the message, back in CRLF.
struct Dump {
    /// `X-Mail-Args` and friends, as (name, value).
    records: Vec<(String, String)>,
    /// The message as the client sent it (smtp-sink stores LF line ends and adds an empty
    /// line at the end; both undone here).
    message: Vec<u8>,
}

impl Dump {
    fn parse(raw: &[u8]) -> Dump {
        let raw = raw.strip_suffix(b"\n").unwrap_or(raw);
        let mut records = Vec::new();
        let mut at = 0;
        let mut in_received = false;
        // The X- records, then its three-line Received header, which ends its part.
        while at < raw.len() {
            let end = raw[at..]
                .iter()
                .position(|&b| b == b'\n')
                .map_or(raw.len(), |i| at + i + 1);
            let line = String::from_utf8_lossy(&raw[at..end])
                .trim_end()
                .to_string();
            if in_received && !line.starts_with(['\t', ' ']) {
                break;
            }
            if line.starts_with("Received:") {
                in_received = true;
            } else if !in_received && let Some((name, value)) = line.split_once(':') {
                records.push((name.to_string(), value.trim().to_string()));
            }
            at = end;
        }
        let mut message = Vec::with_capacity(raw.len() - at + 64);
        for &b in &raw[at..] {
            if b == b'\n' {
                message.push(b'\r');
            }
            message.push(b);
        }
        Dump { records, message }
    }

    fn record(&self, name: &str) -> Vec<&str> {
        self.records
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// Each MIME part of `message` as Python's `email` package sees it: content type, the
/// Content-Transfer-Encoding fields, and for leaves the decoded payload and the parser's
/// complaints. Python is the independent reader here (Herald parses with mail-parser).
const PARTS_PY: &str = r#"
import base64, email, json, sys
from email import policy
msg = email.message_from_bytes(sys.stdin.buffer.read(), policy=policy.compat32)
out = []
for part in msg.walk():
    item = {
        "type": part.get_content_type(),
        "cte": [str(v).strip() for v in (part.get_all("Content-Transfer-Encoding") or [])],
        "defects": [type(d).__name__ for d in part.defects],
    }
    if not part.is_multipart():
        item["data"] = base64.b64encode(part.get_payload(decode=True) or b"").decode()
    out.append(item)
print(json.dumps(out))
"#;

#[derive(Debug, PartialEq)]
struct Part {
    content_type: String,
    cte: Vec<String>,
    defects: Vec<String>,
    /// Decoded payload of a leaf; `None` for a multipart.
    data: Option<Vec<u8>>,
}

fn mime_parts(message: &[u8]) -> Vec<Part> {
    let mut child = Command::new(venv_dir().join("bin/python"))
        .args(["-c", PARTS_PY])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run python for the MIME parts");
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(message)
        .expect("write the message to python");
    let out = child.wait_with_output().expect("wait for python");
    assert!(
        out.status.success(),
        "python email parser failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let parts: Value = serde_json::from_slice(&out.stdout).expect("python printed JSON");
    parts
        .as_array()
        .expect("a JSON list")
        .iter()
        .map(|p| Part {
            content_type: p["type"].as_str().unwrap_or_default().to_string(),
            cte: p["cte"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str().map(str::to_lowercase))
                        .collect()
                })
                .unwrap_or_default(),
            defects: p["defects"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default(),
            data: p["data"]
                .as_str()
                .map(|d| B64.decode(d).expect("python wrote base64")),
        })
        .collect()
}

/// A text payload compared line by line: the line end before a boundary belongs to the
/// boundary, so whether a decoded text ends with one is not part of its content.
fn text_lines(data: &[u8]) -> String {
    String::from_utf8(data.to_vec())
        .expect("decoded text is UTF-8")
        .replace("\r\n", "\n")
        .trim_end_matches('\n')
        .to_string()
}

/// The body (after the first empty line) of a CRLF message.
fn body_of(message: &[u8]) -> &[u8] {
    let at = message
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a header/body separator");
    &message[at + 4..]
}

/// The message submitted over SMTP: dot-stuffed, ended with `.`.
fn smtp_data(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + 8);
    for line in message.split_inclusive(|&b| b == b'\n') {
        if line.starts_with(b".") {
            out.push(b'.');
        }
        out.extend_from_slice(line);
    }
    out.extend_from_slice(b".\r\n");
    out
}

/// Field order is drop order: smtp-sink first, then the fleet (Herald, peers, scenario dir).
struct Setup {
    sink: SmtpSink,
    fleet: Fleet,
}

impl Setup {
    /// smtp-sink without 8BITMIME is the MX of `old.test`; a recording MX (with 8BITMIME)
    /// is the MX of `new.test`.
    fn start(name: &str) -> Setup {
        let scenario = Scenario::new(name);
        let sink = SmtpSink::start(&scenario, scenario.ip());
        let sink_ip = match sink.addr {
            SocketAddr::V4(a) => *a.ip(),
            SocketAddr::V6(_) => unreachable!("unique_ip is IPv4"),
        };
        let fleet = Fleet::start_in(
            scenario,
            FleetOptions {
                domains: &["new.test"],
                other_mx: &[("old.test", sink_ip)],
                deliveries: &["delivery"],
                ack_wait: Duration::from_secs(5),
                retry_initial: Duration::from_secs(2),
                retry_max: Duration::from_secs(4),
                ..Default::default()
            },
        );
        Setup { sink, fleet }
    }

    /// Submits `message` with `BODY=8BITMIME` to both recipients; returns its queue id.
    fn submit(&self, message: &[u8]) -> String {
        self.fleet.submit_one(
            &format!("MAIL FROM:<{SENDER}> BODY=8BITMIME"),
            &[OLD, NEW],
            &smtp_data(message),
        )
    }

    /// Waits until every queue id has a `delivered` event for both domains.
    fn wait_delivered(&self, qids: &[&str]) {
        let done = wait_until(Duration::from_secs(30), Duration::from_millis(200), || {
            let ev = events(&self.fleet.nats.url());
            qids.iter()
                .all(|q| {
                    ["old.test", "new.test"].iter().all(|d| {
                        ev.iter().any(|e| {
                            e.queue_id == *q && e.domain == *d && e.kind == EventKind::Delivered
                        })
                    })
                })
                .then_some(())
        });
        if done.is_none() {
            let ev: Vec<String> = events(&self.fleet.nats.url())
                .iter()
                .map(|e| {
                    format!(
                        "{} {} {} {} {}",
                        e.queue_id,
                        e.kind.word(),
                        e.domain,
                        e.attempt,
                        e.reply_text
                    )
                })
                .collect();
            panic!(
                "not delivered to both MXs within 30 s; events:\n{}\n{}",
                ev.join("\n"),
                self.logs()
            );
        }
    }

    fn logs(&self) -> String {
        format!(
            "{}\n--- smtp-sink:\n{}",
            self.fleet.logs(),
            std::fs::read_to_string(&self.sink.log).unwrap_or_default()
        )
    }
}

fn is_dump_of(dump: &Dump, message_id: &str) -> bool {
    header_values(&dump.message, "Message-ID")
        .iter()
        .any(|v| v.trim() == message_id)
}

fn save(dir: &Path, name: &str, bytes: &[u8]) {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

#[test]
fn eight_bit_mail_is_converted_for_an_mx_without_8bitmime_and_left_alone_otherwise() {
    require_netns();
    let s = Setup::start("eightbit");
    let pid = std::process::id();
    let text_id = format!("<eightbit-text-{pid}@example.test>");
    let multi_id = format!("<eightbit-multipart-{pid}@example.test>");
    let text = text_message(&text_id);
    let multi = multipart_message(&multi_id);
    save(s.fleet.scenario.dir(), "submitted-text.eml", &text);
    save(s.fleet.scenario.dir(), "submitted-multipart.eml", &multi);
    let text_qid = s.submit(&text);
    let multi_qid = s.submit(&multi);
    s.wait_delivered(&[&text_qid, &multi_qid]);

    // --- old.test: smtp-sink without 8BITMIME.
    let dumps = s.sink.dumps();
    assert_eq!(dumps.len(), 2, "one dump per message\n{}", s.logs());
    let parsed: Vec<(PathBuf, Dump)> = dumps
        .iter()
        .map(|(p, raw)| (p.clone(), Dump::parse(raw)))
        .collect();
    for (path, raw) in &dumps {
        let eight: Vec<usize> = raw
            .iter()
            .enumerate()
            .filter(|(_, b)| **b >= 0x80)
            .map(|(i, _)| i)
            .collect();
        assert!(
            eight.is_empty(),
            "{}: {} bytes >= 0x80, the first at offset {}",
            path.display(),
            eight.len(),
            eight[0]
        );
    }
    for (path, dump) in &parsed {
        let mail_args = dump.record("X-Mail-Args");
        assert_eq!(mail_args.len(), 1, "{}: {:?}", path.display(), dump.records);
        assert!(
            mail_args[0].contains(SENDER) && !mail_args[0].to_uppercase().contains("8BITMIME"),
            "MAIL to an MX without 8BITMIME: {:?}",
            mail_args[0]
        );
        assert!(
            !mail_args[0].to_uppercase().contains("SMTPUTF8"),
            "{mail_args:?}"
        );
        let sigs = dkim_signatures(&dump.message);
        assert!(
            sigs.iter()
                .any(|t| t.get("d").map(String::as_str) == Some("example.test")),
            "{}: no DKIM-Signature for example.test: {sigs:?}",
            path.display()
        );
        let (ok, report) = dkim_verify(&dump.message, &s.fleet.dns);
        assert!(
            ok,
            "{}: DKIM does not verify over the converted message:\n{report}\n{}",
            path.display(),
            String::from_utf8_lossy(&dump.message)
        );
    }
    let find = |id: &str| -> &Dump {
        parsed
            .iter()
            .find(|(_, d)| is_dump_of(d, id))
            .map(|(_, d)| d)
            .unwrap_or_else(|| panic!("no dump of {id}\n{}", s.logs()))
    };

    // The single-part text: quoted-printable, and it decodes back to the text.
    let converted = find(&text_id);
    save(
        s.fleet.scenario.dir(),
        "converted-text.eml",
        &converted.message,
    );
    let parts = mime_parts(&converted.message);
    assert_eq!(parts.len(), 1, "{parts:?}");
    let p = &parts[0];
    assert_eq!(p.content_type, "text/plain");
    assert_eq!(p.cte, ["quoted-printable"], "one CTE field, QP");
    assert!(p.defects.is_empty(), "{:?}", p.defects);
    let decoded = p.data.as_deref().expect("a leaf has data");
    assert_eq!(text_lines(decoded), text_lines(TEXT.as_bytes()));
    // Everything above the body but the encoding field is as the app wrote it, plus what
    // Herald adds in front (Received, DKIM-Signature).
    for name in ["From", "To", "Subject", "MIME-Version", "Content-Type"] {
        assert_eq!(
            header_values(&converted.message, name),
            header_values(&text, name),
            "{name}"
        );
    }

    // The multipart: relabelled 7bit, text part QP, attachment base64, both decode back.
    let converted = find(&multi_id);
    save(
        s.fleet.scenario.dir(),
        "converted-multipart.eml",
        &converted.message,
    );
    let parts = mime_parts(&converted.message);
    let original = mime_parts(&multi);
    let kinds: Vec<&str> = parts.iter().map(|p| p.content_type.as_str()).collect();
    assert_eq!(
        kinds,
        ["multipart/mixed", "text/plain", "application/octet-stream"],
        "{parts:?}"
    );
    for p in &parts {
        assert!(p.defects.is_empty(), "{p:?}");
    }
    assert_eq!(parts[0].cte, ["7bit"], "the multipart is relabelled 7bit");
    assert_eq!(parts[1].cte, ["quoted-printable"]);
    assert_eq!(parts[2].cte, ["base64"]);
    assert_eq!(
        text_lines(parts[1].data.as_deref().expect("leaf")),
        text_lines(TEXT.as_bytes())
    );
    let bytes = parts[2].data.as_deref().expect("leaf");
    assert_eq!(
        original[2].data.as_deref(),
        Some(&attachment()[..]),
        "the test's own reading of the submitted attachment"
    );
    assert!(
        bytes == attachment().as_slice(),
        "attachment decodes to {} bytes, sent {}:\n{:?}\n{:?}",
        bytes.len(),
        attachment().len(),
        String::from_utf8_lossy(bytes),
        String::from_utf8_lossy(&attachment())
    );

    // --- new.test: the recording MX announces 8BITMIME; nothing is converted.
    let mx_events = s.fleet.mx("new.test").events();
    let mails: Vec<_> = mx_events.iter().filter(|e| e.ev == "mail").collect();
    assert_eq!(mails.len(), 2, "{mx_events:?}");
    for m in &mails {
        assert!(
            m.args
                .iter()
                .any(|a| a.eq_ignore_ascii_case("BODY=8BITMIME")),
            "MAIL to an MX with 8BITMIME: {:?}",
            m.args
        );
    }
    let stored = s.fleet.mx("new.test").messages();
    assert_eq!(stored.len(), 2, "{}", s.logs());
    for (id, sent) in [(&text_id, &text), (&multi_id, &multi)] {
        let got = stored
            .iter()
            .find(|m| {
                header_values(m, "Message-ID")
                    .iter()
                    .any(|v| v.trim() == id.as_str())
            })
            .unwrap_or_else(|| panic!("{id} not at the recording MX"));
        assert!(
            body_of(got) == body_of(sent),
            "{id}: the body changed on its way to an 8BITMIME MX"
        );
        assert_eq!(
            header_values(got, "Content-Transfer-Encoding"),
            ["8bit"],
            "{id}"
        );
        // Without the 'X-Recording-Peer' line the MX adds in front.
        let message = got
            .splitn(2, |&b| b == b'\n')
            .nth(1)
            .expect("the MX's first line ends");
        let (ok, report) = dkim_verify(message, &s.fleet.dns);
        assert!(ok, "{id}: DKIM at the 8BITMIME MX:\n{report}");
    }
}
