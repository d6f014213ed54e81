//! End-to-end harness for Herald: real peers (nats-server, dnsmasq, Postfix, swaks, dkimpy)
//! around the real `herald` binary, one isolated set per scenario.
//!
//! Scenarios run in parallel inside a private network namespace (`scripts/netns.sh`, which
//! `scripts/test.sh` uses). Each one gets its own temp dir ([`Scenario`]), its own ports
//! ([`free_port`]) and its own loopback addresses ([`unique_ip`]); every process it starts
//! is killed when its handle is dropped. Readiness is always polled with a timeout, and a
//! failure panics with the log of the process concerned.
//!
//! Assertions belong on what the peers saw (Maildir contents, swaks output, dkimpy's
//! verdict), never on Herald internals.

mod config;
mod dkim;
mod dns;
mod events;
mod fleet;
mod herald;
mod mail;
mod nats;
mod postfix;
mod process;
mod recording;
mod resources;
mod smtp;
mod swaks;
mod world;

use std::net::{Ipv4Addr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub use config::{DeliveryConfig, HeraldConfig, IngressConfig, Listener, SinkConfig, TlsMode};
pub use dkim::{DkimKey, dkim_verify, dkimpy_sign, self_signed_cert};
pub use dns::{Dns, DnsRecords};
pub use events::{EVENTS_STREAM, Event, EventKind, events, try_events};
pub use fleet::{
    FLEET_ACCOUNT, FLEET_PASSWORD, Fleet, FleetOptions, message_ids, submit, unix_now,
};
pub use herald::{Herald, Role, herald_bin};
pub use mail::{dkim_signatures, dkim_tags, header_values};
pub use nats::Nats;
pub use postfix::Postfix;
pub use recording::{
    MxEvent, MxReply, RecordingMx, data_by_peer, max_concurrent_connections, max_in_window,
    message_id_counts,
};
pub use resources::{DkimAlgorithm, DkimSpec, Resources, Verification};
pub use smtp::RawSmtp;
pub use swaks::{Swaks, SwaksOutput, swaks};
pub use world::{WORLD_ACCOUNT, WORLD_PASSWORD, World, WorldOptions, plaintext_listener};

/// Panics unless the scenario runs inside the private network namespace made by
/// `scripts/netns.sh` (which sets `HERALD_E2E_NETNS=1`). Every scenario calls it first:
/// outside the namespace, Postfix and friends could reach the real resolver.
pub fn require_netns() {
    if std::env::var("HERALD_E2E_NETNS").as_deref() != Ok("1") {
        panic!(
            "e2e scenarios must run inside a private network namespace: scripts/test.sh \
             (or scripts/netns.sh cargo test ...)"
        );
    }
}

/// The workspace root (parent of this crate's directory).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the e2e crate lives inside the workspace")
        .to_path_buf()
}

/// The Python venv made by `scripts/install-deps.sh` (`$HERALD_VENV` or `<root>/.tools/venv`).
pub fn venv_dir() -> PathBuf {
    match std::env::var_os("HERALD_VENV") {
        Some(v) if !v.is_empty() => PathBuf::from(v),
        _ => workspace_root().join(".tools/venv"),
    }
}

/// Finds an executable: first in `extra_dirs`, then on `PATH`, then in /usr/sbin and /usr/bin.
pub fn find_tool(name: &str, extra_dirs: &[PathBuf]) -> PathBuf {
    let path_dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    let fallback = [PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")];
    for dir in extra_dirs.iter().chain(&path_dirs).chain(&fallback) {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "`{name}` not found (looked in {extra_dirs:?}, PATH and /usr/sbin:/usr/bin): \
         run scripts/install-deps.sh --test"
    );
}

static NEXT_IP: AtomicU32 = AtomicU32::new(0);
static NEXT_PORT: AtomicU32 = AtomicU32::new(0);

/// A loopback address no other scenario of this test run uses: 127.X.Y.Z derived from the
/// pid and a process-wide counter. X is never 0, so 127.0.0.1 stays free for the shared
/// services (nats-server, dnsmasq) which bind it on their own ports. Inside the namespace
/// every 127/8 address can be bound on `lo` without configuration.
pub fn unique_ip() -> Ipv4Addr {
    let n = NEXT_IP.fetch_add(1, Ordering::Relaxed);
    let pid = std::process::id();
    let x = 1 + pid % 254;
    let y = (pid / 254 + n / 254) % 256;
    let z = 1 + n % 254;
    Ipv4Addr::new(127, x as u8, y as u8, z as u8)
}

/// A TCP+UDP port free on 127.0.0.1, below the kernel's ephemeral range (32768+), so an
/// outgoing connection's source port cannot take it between this call and the bind.
/// Distinct within the process; the start point depends on the pid.
pub fn free_port() -> u16 {
    let pid = std::process::id();
    for _ in 0..22_000 {
        let n = NEXT_PORT.fetch_add(1, Ordering::Relaxed);
        let port = 10_000 + ((pid % 1000) * 20 + n) % 22_000;
        let port = port as u16;
        let tcp = TcpListener::bind((Ipv4Addr::LOCALHOST, port));
        let udp = UdpSocket::bind((Ipv4Addr::LOCALHOST, port));
        if tcp.is_ok() && udp.is_ok() {
            return port;
        }
    }
    panic!("no free port on 127.0.0.1 between 10000 and 32000");
}

/// Polls `probe` every `every` until it returns `Some` or `timeout` passes.
pub fn wait_until<T>(
    timeout: Duration,
    every: Duration,
    mut probe: impl FnMut() -> Option<T>,
) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = probe() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(every);
    }
}

/// One scenario's private directory. Kept (and its path printed) when the test panics or
/// `HERALD_E2E_KEEP=1`, so the logs of every process can be read afterwards; removed
/// otherwise. Declare it before the processes of the scenario so that it is dropped last.
pub struct Scenario {
    name: String,
    path: PathBuf,
    dir: Option<tempfile::TempDir>,
}

impl Scenario {
    /// Calls [`require_netns`], then creates the scenario's temp dir.
    pub fn new(name: &str) -> Scenario {
        require_netns();
        let dir = tempfile::Builder::new()
            .prefix(&format!("herald-e2e-{name}-"))
            .tempdir()
            .expect("create the scenario's temp dir");
        // Postfix's daemons run as user postfix and must traverse it.
        set_mode(dir.path(), 0o755);
        Scenario {
            name: name.to_string(),
            path: dir.path().to_path_buf(),
            dir: Some(dir),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn dir(&self) -> &Path {
        &self.path
    }

    /// `<scenario dir>/<name>`, created (with parents) if missing.
    pub fn subdir(&self, name: &str) -> PathBuf {
        let p = self.path.join(name);
        std::fs::create_dir_all(&p).unwrap_or_else(|e| panic!("create {}: {e}", p.display()));
        set_mode(&p, 0o755);
        p
    }

    /// A fresh loopback address (see [`unique_ip`]).
    pub fn ip(&self) -> Ipv4Addr {
        unique_ip()
    }

    /// A fresh port on 127.0.0.1 (see [`free_port`]).
    pub fn port(&self) -> u16 {
        free_port()
    }
}

impl Drop for Scenario {
    fn drop(&mut self) {
        if let Some(dir) = self.dir.take() {
            let keep = std::env::var("HERALD_E2E_KEEP").as_deref() == Ok("1");
            if keep || std::thread::panicking() {
                let path = dir.keep();
                eprintln!(
                    "scenario {}: files and logs kept in {}",
                    self.name,
                    path.display()
                );
            }
        }
    }
}

pub(crate) fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {mode:o} {}: {e}", path.display()));
}

/// The last `max` bytes of `text` (on a char boundary), marked when cut.
pub(crate) fn tail(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut start = text.len() - max;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    format!("[... {start} bytes cut ...]\n{}", &text[start..])
}

/// Reads a text file for a panic message; never fails.
pub(crate) fn read_lossy(path: &Path) -> String {
    match std::fs::read(path) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(e) => format!("<cannot read {}: {e}>", path.display()),
    }
}
