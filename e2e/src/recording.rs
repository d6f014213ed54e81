//! A recipient MX that records precisely what it saw (`e2e/tools/recording_mx.py`, on
//! aiosmtpd), for scenarios about how Herald delivers rather than what: simultaneous
//! connections, messages per time window and per source IP, duplicates after a crash.
//! Its behaviour (refusals, per-recipient replies, a slow end of DATA) is steered at run
//! time through a JSON control file.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use serde_json::Value;

use crate::process::Managed;
use crate::{Scenario, venv_dir, wait_until, workspace_root};

const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// One line of the MX's log. Fields that an event does not carry are `None` / empty.
#[derive(Clone, Debug, PartialEq)]
pub struct MxEvent {
    /// Unix time (seconds) at the MX.
    pub t: f64,
    /// `connect`, `refused`, `ehlo`, `mail`, `rcpt`, `data` or `close`.
    pub ev: String,
    /// Connection id, unique within one MX process.
    pub conn: u64,
    pub peer: IpAddr,
    /// The listener (`ip:port`) the connection came in on.
    pub local: String,
    /// `ehlo`: the client's EHLO name.
    pub name: Option<String>,
    /// `mail` and `data`: the reverse path.
    pub from: Option<String>,
    /// `mail`: the MAIL FROM parameters (upper-cased by aiosmtpd).
    pub args: Vec<String>,
    /// `rcpt`: the recipient.
    pub to: Option<String>,
    /// `data`: the recipients accepted in that transaction.
    pub rcpts: Vec<String>,
    /// `data`: the Message-ID header, as sent.
    pub message_id: Option<String>,
    /// `data`: size of the content in bytes.
    pub size: Option<u64>,
    /// `refused`: the whole reply line; `rcpt` and `data`: the reply code.
    pub reply: Option<MxReply>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum MxReply {
    Code(u16),
    Line(String),
}

impl MxReply {
    pub fn code(&self) -> Option<u16> {
        match self {
            MxReply::Code(c) => Some(*c),
            MxReply::Line(l) => l.get(..3).and_then(|c| c.parse().ok()),
        }
    }
}

impl MxEvent {
    /// Parses one log line; `None` if it is not an event object.
    pub fn parse(line: &str) -> Option<MxEvent> {
        let v: Value = serde_json::from_str(line).ok()?;
        let text = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
        let list = |k: &str| -> Vec<String> {
            v.get(k)
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default()
        };
        let reply = match v.get("reply") {
            Some(Value::Number(n)) => n
                .as_u64()
                .and_then(|c| u16::try_from(c).ok())
                .map(MxReply::Code),
            Some(Value::String(s)) => Some(MxReply::Line(s.clone())),
            _ => None,
        };
        Some(MxEvent {
            t: v.get("t")?.as_f64()?,
            ev: text("ev")?,
            conn: v.get("conn")?.as_u64()?,
            peer: v.get("peer")?.as_str()?.parse().ok()?,
            local: text("local")?,
            name: text("name"),
            from: text("from"),
            args: list("args"),
            to: text("to"),
            rcpts: list("rcpts"),
            message_id: text("message_id"),
            size: v.get("size").and_then(Value::as_u64),
            reply,
        })
    }

    pub fn reply_code(&self) -> Option<u16> {
        self.reply.as_ref().and_then(MxReply::code)
    }

    /// A `data` event the MX answered with 2xx: a message it took (and stored).
    pub fn is_accepted_data(&self) -> bool {
        self.ev == "data" && self.reply_code().is_some_and(|c| (200..300).contains(&c))
    }

    /// An event with only the common fields, for synthetic logs in tests.
    pub fn new(t: f64, ev: &str, conn: u64, peer: IpAddr) -> MxEvent {
        MxEvent {
            t,
            ev: ev.to_string(),
            conn,
            peer,
            local: String::new(),
            name: None,
            from: None,
            args: Vec::new(),
            to: None,
            rcpts: Vec::new(),
            message_id: None,
            size: None,
            reply: None,
        }
    }
}

/// `recording_mx.py` on one or more listen addresses, killed on drop.
pub struct RecordingMx {
    listen: Vec<SocketAddr>,
    log: PathBuf,
    control: PathBuf,
    dir: PathBuf,
    /// mtime of the last control file written: the next one gets a later one.
    last_control_mtime: Mutex<Option<SystemTime>>,
    process: Managed,
}

impl RecordingMx {
    /// Starts the MX (files under `<scenario>/mx-<name>/`) and waits for its `ready`.
    pub fn start(scenario: &Scenario, name: &str, listen: &[SocketAddr]) -> RecordingMx {
        assert!(!listen.is_empty(), "RecordingMx {name}: no listen address");
        let base = scenario.subdir(&format!("mx-{name}"));
        let log = base.join("events.jsonl");
        let control = base.join("control.json");
        let dir = base.join("mail");
        let mut args: Vec<OsString> = vec![
            workspace_root()
                .join("e2e/tools/recording_mx.py")
                .into_os_string(),
        ];
        for addr in listen {
            args.push("--listen".into());
            args.push(addr.to_string().into());
        }
        for (flag, value) in [("--log", &log), ("--control", &control), ("--dir", &dir)] {
            args.push(flag.into());
            args.push(value.clone().into_os_string());
        }
        args.push("--hostname".into());
        args.push(format!("mx-{name}.test").into());
        let mut process = Managed::new(
            &format!("recording MX {name}"),
            venv_dir().join("bin/python"),
            args,
            base.join("recording_mx.log"),
        );
        process.spawn();
        // Its stdout goes to the process log; a TCP probe would show up as a connection.
        process.wait_ready("`ready` on stdout", READY_TIMEOUT, || {
            std::fs::read_to_string(base.join("recording_mx.log"))
                .is_ok_and(|l| l.lines().any(|line| line == "ready"))
        });
        RecordingMx {
            listen: listen.to_vec(),
            log,
            control,
            dir,
            last_control_mtime: Mutex::new(None),
            process,
        }
    }

    pub fn listen(&self) -> &[SocketAddr] {
        &self.listen
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Replaces the control file (see the tool's docstring for the fields). Written to a
    /// temp file and renamed; its mtime is made strictly later than the previous one's,
    /// so that the MX notices even two writes within one timestamp tick.
    pub fn set_control(&self, json: Value) {
        let tmp = self.control.with_extension("json.tmp");
        let text = serde_json::to_vec_pretty(&json).expect("a JSON value serializes");
        std::fs::write(&tmp, text).unwrap_or_else(|e| panic!("write {}: {e}", tmp.display()));
        let mut last = self
            .last_control_mtime
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let now = SystemTime::now();
        let mtime = match *last {
            Some(prev) if prev >= now => prev + Duration::from_millis(1),
            _ => now,
        };
        std::fs::File::options()
            .write(true)
            .open(&tmp)
            .and_then(|f| f.set_modified(mtime))
            .unwrap_or_else(|e| panic!("set mtime of {}: {e}", tmp.display()));
        std::fs::rename(&tmp, &self.control)
            .unwrap_or_else(|e| panic!("rename {} into place: {e}", tmp.display()));
        *last = Some(mtime);
    }

    /// Every event logged so far, in log order (a line still being written is left out).
    pub fn events(&self) -> Vec<MxEvent> {
        let text = match std::fs::read_to_string(&self.log) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
            Err(e) => panic!("read {}: {e}", self.log.display()),
        };
        let complete = match text.rfind('\n') {
            Some(i) => &text[..=i],
            None => "",
        };
        complete
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                MxEvent::parse(l)
                    .unwrap_or_else(|| panic!("{}: not an MX event line: {l}", self.log.display()))
            })
            .collect()
    }

    /// The stored messages in arrival order, each starting with `X-Recording-Peer: <ip>`.
    pub fn messages(&self) -> Vec<Vec<u8>> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
            Err(e) => panic!("list {}: {e}", self.dir.display()),
        };
        let mut named: Vec<(u128, PathBuf)> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "eml"))
            .filter_map(|p| {
                let n = p.file_stem()?.to_str()?.parse().ok()?;
                Some((n, p))
            })
            .collect();
        named.sort();
        named
            .into_iter()
            .filter_map(|(_, p)| std::fs::read(p).ok())
            .collect()
    }

    /// Waits until at least `n` messages were accepted; returns their `data` events, or
    /// `None` on timeout (the caller adds its own context to the failure).
    pub fn wait_for_data(&self, n: usize, timeout: Duration) -> Option<Vec<MxEvent>> {
        wait_until(timeout, Duration::from_millis(100), || {
            let data: Vec<MxEvent> = self
                .events()
                .into_iter()
                .filter(MxEvent::is_accepted_data)
                .collect();
            (data.len() >= n).then_some(data)
        })
    }

    /// Accepted messages per client IP.
    pub fn data_by_peer(&self) -> BTreeMap<IpAddr, usize> {
        data_by_peer(&self.events())
    }

    /// How often each Message-ID was accepted (more than 1: a duplicate delivery).
    pub fn message_id_counts(&self) -> BTreeMap<String, usize> {
        message_id_counts(&self.events())
    }

    /// The MX process's own output (Python tracebacks land here).
    pub fn log_tail(&self) -> String {
        self.process.log_tail()
    }
}

/// The most connections open at once, from `connect` / `close` events (refused ones count
/// while they were open), optionally only those from `peer`. Events are ordered by time,
/// ties kept in log order.
pub fn max_concurrent_connections(events: &[MxEvent], peer: Option<IpAddr>) -> usize {
    let mut ordered: Vec<&MxEvent> = events
        .iter()
        .filter(|e| peer.is_none_or(|p| e.peer == p))
        .filter(|e| e.ev == "connect" || e.ev == "close")
        .collect();
    ordered.sort_by(|a, b| a.t.total_cmp(&b.t));
    let mut open = BTreeSet::new();
    let mut max = 0;
    for e in ordered {
        if e.ev == "connect" {
            open.insert(e.conn);
            max = max.max(open.len());
        } else {
            open.remove(&e.conn);
        }
    }
    max
}

/// The largest number of `timestamps` inside any half-open window `[t, t + window_secs)`.
pub fn max_in_window(timestamps: &[f64], window_secs: f64) -> usize {
    let mut ts = timestamps.to_vec();
    ts.sort_by(f64::total_cmp);
    let mut max = 0;
    let mut end = 0;
    // A window holding the most points can always be slid right until it starts at one.
    for (start, &t) in ts.iter().enumerate() {
        end = end.max(start);
        while end < ts.len() && ts[end] < t + window_secs {
            end += 1;
        }
        max = max.max(end - start);
    }
    max
}

/// Accepted messages per client IP.
pub fn data_by_peer(events: &[MxEvent]) -> BTreeMap<IpAddr, usize> {
    let mut out = BTreeMap::new();
    for e in events.iter().filter(|e| e.is_accepted_data()) {
        *out.entry(e.peer).or_insert(0) += 1;
    }
    out
}

/// How often each Message-ID was accepted (messages without one are not counted).
pub fn message_id_counts(events: &[MxEvent]) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for e in events.iter().filter(|e| e.is_accepted_data()) {
        if let Some(id) = &e.message_id {
            *out.entry(id.clone()).or_insert(0) += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    fn ev(t: f64, kind: &str, conn: u64, peer: u8) -> MxEvent {
        MxEvent::new(t, kind, conn, ip(peer))
    }

    fn data(t: f64, conn: u64, peer: u8, id: &str, code: u16) -> MxEvent {
        let mut e = ev(t, "data", conn, peer);
        e.message_id = Some(id.to_string());
        e.reply = Some(MxReply::Code(code));
        e
    }

    #[test]
    fn parses_the_lines_the_tool_writes() {
        let refused = MxEvent::parse(
            r#"{"t": 1.5, "ev": "refused", "conn": 4, "peer": "127.0.0.1", "local": "127.0.0.2:25", "reply": "421 4.7.0 Too many connections"}"#,
        )
        .expect("parses");
        assert_eq!(refused.reply_code(), Some(421));
        assert_eq!(refused.local, "127.0.0.2:25");
        let d = MxEvent::parse(
            r#"{"t": 2.0, "ev": "data", "conn": 4, "peer": "127.0.0.1", "local": "x", "from": "a@b", "rcpts": ["c@d"], "message_id": "<m@x>", "size": 10, "reply": 250}"#,
        )
        .expect("parses");
        assert!(d.is_accepted_data());
        assert_eq!(d.rcpts, vec!["c@d".to_string()]);
        assert_eq!(d.message_id.as_deref(), Some("<m@x>"));
        assert_eq!(d.size, Some(10));
        assert!(MxEvent::parse("{\"t\": 1}").is_none());
    }

    #[test]
    fn concurrent_connections_follow_connect_and_close() {
        let events = vec![
            ev(0.0, "connect", 1, 1),
            ev(0.1, "connect", 2, 1),
            ev(0.2, "connect", 3, 2),
            // Refused, but open for a moment: it counts.
            ev(0.25, "refused", 3, 2),
            ev(0.3, "close", 1, 1),
            ev(0.3, "close", 3, 2),
            ev(0.4, "connect", 4, 1),
            ev(0.5, "close", 2, 1),
            ev(0.6, "close", 4, 1),
        ];
        assert_eq!(max_concurrent_connections(&events, None), 3);
        assert_eq!(max_concurrent_connections(&events, Some(ip(1))), 2);
        assert_eq!(max_concurrent_connections(&events, Some(ip(2))), 1);
        assert_eq!(max_concurrent_connections(&events, Some(ip(9))), 0);
        assert_eq!(max_concurrent_connections(&[], None), 0);
    }

    #[test]
    fn a_close_at_the_same_time_as_a_connect_is_taken_in_log_order() {
        let events = vec![
            ev(0.0, "connect", 1, 1),
            ev(1.0, "close", 1, 1),
            ev(1.0, "connect", 2, 1),
        ];
        assert_eq!(max_concurrent_connections(&events, None), 1);
    }

    #[test]
    fn window_is_half_open() {
        assert_eq!(max_in_window(&[], 1.0), 0);
        assert_eq!(max_in_window(&[5.0], 1.0), 1);
        // 0.0 and 1.0 are not in one window of 1 s: [0, 1) leaves 1.0 out.
        assert_eq!(max_in_window(&[0.0, 1.0, 2.0], 1.0), 1);
        assert_eq!(max_in_window(&[0.0, 0.5, 0.99, 1.0], 1.0), 3);
        // [0.5, 1.5) beats [0, 1).
        assert_eq!(max_in_window(&[0.0, 0.5, 0.99, 1.0, 1.2], 1.0), 4);
        // Unsorted input and a dense burst later on.
        assert_eq!(max_in_window(&[9.0, 0.0, 9.1, 9.2, 3.0, 9.9], 1.0), 4);
        assert_eq!(max_in_window(&[0.0, 0.0, 0.0], 0.5), 3);
    }

    #[test]
    fn data_counts_only_accepted_messages() {
        let events = vec![
            data(1.0, 1, 1, "<a@x>", 250),
            data(1.1, 1, 1, "<b@x>", 250),
            data(1.2, 2, 2, "<a@x>", 250),
            data(1.3, 2, 2, "<c@x>", 451),
            ev(1.4, "close", 2, 2),
        ];
        let by_peer = data_by_peer(&events);
        assert_eq!(by_peer.get(&ip(1)), Some(&2));
        assert_eq!(by_peer.get(&ip(2)), Some(&1));
        let ids = message_id_counts(&events);
        assert_eq!(ids.get("<a@x>"), Some(&2));
        assert_eq!(ids.get("<b@x>"), Some(&1));
        assert_eq!(ids.get("<c@x>"), None);
    }
}
