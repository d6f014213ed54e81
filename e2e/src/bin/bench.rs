//! Throughput benchmark (issue 8): messages per second end to end, counted at the sink, for
//!
//! - the ceiling: `smtp-source -> smtp-sink`;
//! - Herald: `smtp-source -> herald ingress -> JetStream (R1, file) -> herald delivery
//!   (DKIM RSA-2048, MX from dnsmasq) -> smtp-sink`;
//! - Postfix 3.7 as a relay: `smtp-source -> postfix (mynetworks, relayhost) -> smtp-sink`.
//!
//! Run it with `scripts/bench.sh [--quick]` (release build, inside `scripts/netns.sh`). Every
//! figure counts the files smtp-sink dumps (one per transaction): the count at the sink must
//! equal the count sent; anything missing or doubled is reported, and the exit code is 1.
//! Besides throughput it reports, per process, the peak RSS (`VmHWM`) and CPU seconds per
//! 1,000 messages (`utime + stime` from `/proc/<pid>/stat`). No thresholds are asserted.
//!
//! After the throughput figures of a message size it measures
//!
//! - **accept latency**: an open-loop client (below, [`open_loop`]) sends at fixed rates
//!   (half of Herald's and of Postfix's measured throughput unless `--latency-rate`), one new
//!   connection per message, and times EHLO -> `250` after the end of DATA; meanwhile a
//!   stamping sink ([`StampSink`]) takes smtp-sink's address and notes when each message
//!   arrives, which gives the end-of-data-to-delivered and accept-to-delivered latencies;
//! - with `--perf`, a profile: one extra Herald figure with `perf record` attached to the
//!   ingress and the delivery process (`perf report --no-children --sort symbol`);
//! - **scaling**: Herald's throughput with 1, 2, 4 delivery processes (`--delivery-processes`).
//!
//! ```text
//! bench [--quick] [--messages N] [--reps R] [--sessions S] [--sizes 10240,102400]
//!       [--warmup W] [--systems ceiling,herald,postfix] [--delivery-concurrency C]
//!       [--latency-messages N] [--latency-rate R,...] [--latency-connections C]
//!       [--latency-sizes 10240] [--delivery-processes 1,2,4] [--scaling-size 10240]
//!       [--perf] [--perf-call-graph fp|dwarf] [--out-dir DIR]
//! ```

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use herald_e2e::{
    DeliveryConfig, DkimAlgorithm, DkimKey, Dns, DnsRecords, Herald, HeraldConfig, IngressConfig,
    Listener, Nats, Postfix, Resources, Role, Scenario, TlsMode, find_tool, herald_bin,
};

/// Envelope and header sender: the MailDomain's domain.
const SENDER: &str = "sender@example.test";
/// Recipient domain whose MX (in dnsmasq) is the sink.
const RECIPIENT: &str = "user@rcpt.test";
const SINK_PORT: u16 = 2525;
/// A figure gives up when the sink count has not moved for this long.
const STALL: Duration = Duration::from_secs(90);
/// Longer than Herald's (`delivery.shaping.idle_timeout`, 5 s) and Postfix's
/// (`smtp_connection_cache_time_limit`, 2 s) idle connections to the sink live.
const IDLE_CLOSE: Duration = Duration::from_secs(6);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum System {
    Ceiling,
    Herald,
    Postfix,
}

impl System {
    fn name(self) -> &'static str {
        match self {
            System::Ceiling => "ceiling",
            System::Herald => "herald",
            System::Postfix => "postfix",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            System::Ceiling => "ceiling (smtp-source -> smtp-sink)",
            System::Herald => "Herald (ingress -> JetStream -> delivery, DKIM)",
            System::Postfix => "Postfix 3.7 relay",
        }
    }
}

struct Opts {
    quick: bool,
    messages: usize,
    reps: usize,
    sessions: usize,
    warmup: usize,
    sizes: Vec<usize>,
    systems: Vec<System>,
    /// `delivery.concurrency` of each Herald delivery process.
    concurrency: usize,
    /// Messages per system of each accept-latency run (0: no latency runs).
    latency_messages: usize,
    /// Offered rates of the latency runs (msg/s); default: half of Herald's throughput
    /// measured just before at the same size, and half of Postfix's when that is lower.
    latency_rates: Vec<f64>,
    /// Client threads of the latency runs: at most this many connections at a time.
    latency_connections: usize,
    latency_sizes: Vec<usize>,
    /// Numbers of delivery processes of the scaling series; `[1]` or empty: no series.
    delivery_processes: Vec<usize>,
    /// Message size of the scaling series (default: the first size).
    scaling_size: Option<usize>,
    /// `perf record` the Herald processes during one extra figure per size; the value is
    /// the call-graph mode (`fp` or `dwarf`).
    perf: Option<String>,
    /// Where the full perf reports go (default: none; `scripts/bench.sh` passes
    /// `target/bench`).
    out_dir: Option<PathBuf>,
}

impl Opts {
    fn scaling(&self) -> bool {
        self.delivery_processes.iter().any(|&n| n != 1)
    }

    fn max_delivery_processes(&self) -> usize {
        self.delivery_processes
            .iter()
            .copied()
            .max()
            .unwrap_or(1)
            .max(1)
    }
}

fn usage() -> ! {
    eprintln!(
        "usage: bench [--quick] [--messages N] [--reps R] [--sessions S] [--warmup W] \
         [--delivery-concurrency C] [--sizes BYTES,BYTES] [--systems ceiling,herald,postfix] \
         [--latency-messages N] [--latency-rate MSG_PER_S,...] [--latency-connections C] \
         [--latency-sizes BYTES,...] [--delivery-processes 1,2,4] [--scaling-size BYTES] \
         [--perf] [--perf-call-graph fp|dwarf] [--out-dir DIR]"
    );
    std::process::exit(2);
}

fn parse_opts() -> Opts {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let mut o = Opts {
        quick,
        messages: if quick { 1_000 } else { 20_000 },
        reps: if quick { 1 } else { 3 },
        sessions: 16,
        warmup: if quick { 100 } else { 500 },
        sizes: vec![10 * 1024, 100 * 1024],
        systems: vec![System::Ceiling, System::Herald, System::Postfix],
        concurrency: 64,
        latency_messages: if quick { 1_000 } else { 5_000 },
        latency_rates: Vec::new(),
        latency_connections: 32,
        latency_sizes: vec![10 * 1024],
        delivery_processes: vec![1, 2, 4],
        scaling_size: None,
        perf: None,
        out_dir: None,
    };
    let list = |v: String| -> Vec<usize> {
        v.split(',')
            .filter(|s| !s.trim().is_empty())
            .map(|s| s.trim().parse().unwrap_or_else(|_| usage()))
            .collect()
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || it.next().cloned().unwrap_or_else(|| usage());
        let number = |v: String| v.parse::<usize>().unwrap_or_else(|_| usage());
        match a.as_str() {
            "--quick" => {}
            "--messages" => o.messages = number(value()),
            "--reps" => o.reps = number(value()),
            "--sessions" => o.sessions = number(value()),
            "--warmup" => o.warmup = number(value()),
            "--delivery-concurrency" => o.concurrency = number(value()),
            "--sizes" => o.sizes = list(value()),
            "--latency-messages" => o.latency_messages = number(value()),
            "--latency-rate" => {
                o.latency_rates = value()
                    .split(',')
                    .map(|r| {
                        r.trim()
                            .parse::<f64>()
                            .ok()
                            .filter(|r| *r > 0.0)
                            .unwrap_or_else(|| usage())
                    })
                    .collect()
            }
            "--latency-connections" => o.latency_connections = number(value()),
            "--latency-sizes" => o.latency_sizes = list(value()),
            "--delivery-processes" => o.delivery_processes = list(value()),
            "--scaling-size" => o.scaling_size = Some(number(value())),
            "--perf" => {
                o.perf.get_or_insert_with(|| "fp".into());
            }
            "--perf-call-graph" => {
                let mode = value();
                if mode != "fp" && mode != "dwarf" {
                    usage();
                }
                o.perf = Some(mode);
            }
            "--out-dir" => o.out_dir = Some(PathBuf::from(value())),
            "--systems" => {
                o.systems = value()
                    .split(',')
                    .map(|s| match s.trim() {
                        "ceiling" => System::Ceiling,
                        "herald" => System::Herald,
                        "postfix" => System::Postfix,
                        _ => usage(),
                    })
                    .collect()
            }
            "-h" | "--help" => usage(),
            _ => usage(),
        }
    }
    if o.messages == 0
        || o.reps == 0
        || o.sessions == 0
        || o.sizes.is_empty()
        || o.latency_connections == 0
        || o.delivery_processes.contains(&0)
    {
        usage();
    }
    o
}

// ---------------------------------------------------------------------------------------
// /proc readings

/// Clock ticks per second (`getconf CLK_TCK`; 100 on Linux unless told otherwise).
fn clk_tck() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// (utime + stime, cutime + cstime) of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start at field 3 (state).
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
    // utime is field 14 overall, i.e. index 11 here (state is field 3, index 0).
    Some((n(11)? + n(12)?, n(13)? + n(14)?))
}

/// `VmHWM` (peak resident set) of `pid`, in KiB.
fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// `Pss` of `pid` (its own pages plus its share of shared ones), in KiB.
fn pss_kib(pid: u32) -> Option<u64> {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    rollup
        .lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// The live process whose command line contains `needle` (e.g. a store dir).
fn find_pid(needle: &str) -> Option<u32> {
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(needle) {
            return Some(pid);
        }
    }
    None
}

fn self_children_ticks() -> u64 {
    cpu_ticks(std::process::id()).map_or(0, |(_, c)| c)
}

/// Busy time of the whole machine (all CPUs: user, nice, system, irq, softirq, steal) from
/// `/proc/stat`, in clock ticks: with the processes' own times it shows how much of the
/// CPU went elsewhere (kernel threads, anything else running on the box).
fn machine_busy_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return 0;
    };
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq steal
    [0, 1, 2, 5, 6, 7].iter().filter_map(|&i| f.get(i)).sum()
}

/// `(in_msgs, out_msgs)` of nats-server from its monitoring endpoint (`/varz`): every
/// message clients published (publishes, JetStream API and KV requests, acks, events) and
/// every message it delivered to them (replies, pulled entries, acks of publishes).
fn nats_msgs(monitor_port: u16) -> Option<(u64, u64)> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, monitor_port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"GET /varz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let v: serde_json::Value = serde_json::from_str(text.split_once("\r\n\r\n")?.1).ok()?;
    Some((v["in_msgs"].as_u64()?, v["out_msgs"].as_u64()?))
}

/// The first three fields of `/proc/loadavg` (1, 5 and 15 minutes): not namespaced, so it
/// shows whatever else runs on the machine too.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

// ---------------------------------------------------------------------------------------
// smtp-sink

/// `smtp-sink -d DIR/...` on `<unique ip>:2525`: one file per transaction in `dir` (on
/// /dev/shm when it exists).
struct Sink {
    child: Child,
    addr: SocketAddr,
    dir: PathBuf,
    log: PathBuf,
    /// The dump dir when it is on tmpfs (removed on drop).
    _tmp: Option<tempfile::TempDir>,
}

impl Sink {
    fn start(scenario: &Scenario) -> Sink {
        // On tmpfs when there is one: the sink should cost as little as possible, and not
        // compete for the disk with the queues of the systems under test.
        let tmp = tempfile::Builder::new()
            .prefix("herald-bench-sink-")
            .tempdir_in("/dev/shm")
            .ok();
        let dir = match &tmp {
            Some(t) => t.path().to_path_buf(),
            None => scenario.subdir("sink"),
        };
        // smtp-sink drops privileges to nobody (-u) and writes its files there.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777))
            .expect("chmod the sink dir");
        let addr = SocketAddr::from((scenario.ip(), SINK_PORT));
        let log = scenario.dir().join("smtp-sink.log");
        let mut sink = Sink {
            child: Sink::spawn(addr, &dir, &log),
            addr,
            dir,
            log,
            _tmp: tmp,
        };
        sink.wait_listening();
        sink
    }

    fn spawn(addr: SocketAddr, dir: &Path, log: &Path) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("sink log");
        Command::new(find_tool("smtp-sink", &[]))
            .arg("-4")
            .args(["-u", "nobody"])
            .arg("-d")
            .arg(format!("{}/%Y%m%d%H%M%S.", dir.display()))
            .arg(addr.to_string())
            .arg("1000")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("sink log"))
            .stderr(log)
            .spawn()
            .expect("spawn smtp-sink")
    }

    fn wait_listening(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect_timeout(&self.addr, Duration::from_millis(300)).is_err() {
            if Instant::now() > deadline || self.child.try_wait().ok().flatten().is_some() {
                panic!("smtp-sink did not start on {}", self.addr);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops smtp-sink, freeing its address (for the latency runs' [`StampSink`]).
    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn start_again(&mut self) {
        self.child = Sink::spawn(self.addr, &self.dir, &self.log);
        self.wait_listening();
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn count(&self) -> usize {
        std::fs::read_dir(&self.dir).map_or(0, |d| d.count())
    }

    fn files(&self) -> Vec<PathBuf> {
        std::fs::read_dir(&self.dir)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default()
    }

    /// True when no file is shorter than a message of `size` payload bytes (see
    /// [`min_file_len`]): a shorter file is still being written.
    fn complete(&self, size: usize) -> bool {
        self.files()
            .iter()
            .all(|f| std::fs::metadata(f).is_ok_and(|m| m.len() >= min_file_len(size)))
    }

    fn clear(&self) {
        for f in self.files() {
            let _ = std::fs::remove_file(f);
        }
    }
}

/// The least a complete sink file of a message with `size` payload bytes holds: smtp-sink
/// stores lines with LF instead of CRLF (smtp-source's lines are 80 bytes), and the
/// headers and the sink's X- lines add a few hundred bytes.
fn min_file_len(size: usize) -> u64 {
    (size - size / 40) as u64
}

impl Drop for Sink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------
// The systems under test

struct HeraldStack {
    ingress: Herald,
    /// `delivery`, then `delivery-2`, `delivery-3`, ... (see [`HeraldStack::set_deliveries`]).
    deliveries: Vec<Herald>,
    nats_pid: Option<u32>,
    nats_monitor: u16,
    listen: SocketAddr,
    config: PathBuf,
    delivery_env: Vec<(String, String)>,
    _dns: Dns,
    _nats: Nats,
}

impl HeraldStack {
    /// One ingress and one delivery process. `max_processes` delivery processes of
    /// `concurrency` workers each may run later (scaling): the connection slots per
    /// (source, site) (`delivery.shaping.default.max_connections`, default 32) are raised
    /// to their total, so that the shaping throttle never holds a worker back.
    fn start(
        scenario: &Scenario,
        sink: &Sink,
        concurrency: usize,
        max_processes: usize,
    ) -> HeraldStack {
        let nats = Nats::start(scenario);
        let nats_pid = find_pid(&nats.store_dir().display().to_string());
        let key = DkimKey::rsa(2048);
        let dns = Dns::start(
            scenario,
            &DnsRecords::new()
                .mx("rcpt.test", "mx.rcpt.test", 10)
                .a("mx.rcpt.test", ip4(sink.addr))
                .txt("herald._domainkey.example.test", &key.dns_txt),
        );
        let resources = scenario.subdir("resources");
        Resources::new()
            .signing_domain(
                "example-test",
                "example.test",
                "herald",
                DkimAlgorithm::RsaSha256,
                Some(&key),
                None,
            )
            .account_with_password("bench", "bench-password", &["example-test"])
            // smtp-source cannot AUTH: its connections (from 127.0.0.1) are this account.
            .account_spec("bench", "{clientNetworks: [127.0.0.0/8]}")
            .write(&resources);
        let listen = SocketAddr::from((scenario.ip(), 2587));
        let mut config = HeraldConfig::new(&nats.url(), &resources);
        config.ingress = Some(IngressConfig {
            hostname: "ingress.herald.test".into(),
            tls: None,
            listeners: vec![Listener {
                name: "bench".into(),
                addr: listen,
                tls: TlsMode::None,
                allow_plaintext_auth: false,
            }],
        });
        config.delivery = Some(DeliveryConfig {
            hostname: "mta.herald.test".into(),
            nameservers: vec![dns.addr()],
            smtp_port: 25, // overridden below, as an operator would
            retry_initial: Duration::from_secs(5),
            retry_max: Duration::from_secs(30),
            ack_wait: Duration::from_secs(60),
            extra: None,
        });
        let config = config.write(&scenario.dir().join("herald.yaml"));
        let ingress_env = env(&[("HERALD_INGRESS__MAX_CONNECTIONS_PER_IP", "1000")]);
        let slots = (concurrency * max_processes).max(32);
        let delivery_env = env(&[
            ("HERALD_DELIVERY__CONCURRENCY", &concurrency.to_string()),
            ("HERALD_DELIVERY__SMTP_PORT", &sink.addr.port().to_string()),
            (
                "HERALD_DELIVERY__SHAPING__DEFAULT__MAX_CONNECTIONS",
                &slots.to_string(),
            ),
        ]);
        let ingress = Herald::start_with_env(
            scenario,
            "ingress",
            Role::Ingress,
            &config,
            Some(listen),
            &ingress_env,
        );
        let delivery = Herald::start_with_env(
            scenario,
            "delivery",
            Role::Delivery,
            &config,
            None,
            &delivery_env,
        );
        HeraldStack {
            ingress,
            deliveries: vec![delivery],
            nats_pid,
            nats_monitor: nats.monitor_port(),
            listen,
            config,
            delivery_env,
            _dns: dns,
            _nats: nats,
        }
    }

    /// Starts or stops (SIGTERM) delivery processes until `n` run, all on the same config.
    fn set_deliveries(&mut self, scenario: &Scenario, n: usize) {
        while self.deliveries.len() > n {
            let mut d = self.deliveries.pop().expect("len > n");
            d.terminate();
        }
        if self.deliveries.len() < n {
            let names: Vec<String> = (self.deliveries.len() + 1..=n)
                .map(|k| format!("delivery-{k}"))
                .collect();
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            self.deliveries.extend(Herald::start_several(
                scenario,
                &names,
                Role::Delivery,
                &self.config,
                &self.delivery_env,
            ));
        }
    }

    fn delivery_pids(&self) -> Vec<u32> {
        self.deliveries.iter().filter_map(|d| d.pid()).collect()
    }
}

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn ip4(addr: SocketAddr) -> Ipv4Addr {
    match addr {
        SocketAddr::V4(a) => *a.ip(),
        SocketAddr::V6(_) => panic!("the sink listens on IPv4"),
    }
}

/// The processes a figure accounts CPU to, read before and after it.
struct Accounting<'a> {
    system: System,
    sink: &'a Sink,
    herald: Option<&'a HeraldStack>,
    postfix: Option<&'a Postfix>,
}

impl Accounting<'_> {
    /// (process label, clock ticks so far). smtp-source is a child of this process: its CPU
    /// shows in our `cutime + cstime` once reaped. Postfix's processes come and go: the live
    /// ones plus what the master has reaped.
    fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let own = |pid: Option<u32>| pid.and_then(cpu_ticks).map_or(0, |(o, _)| o);
        let mut v = Vec::new();
        match self.system {
            System::Ceiling => {}
            System::Herald => {
                let h = self.herald.expect("herald stack");
                v.push(("herald ingress", own(h.ingress.pid())));
                let delivery: u64 = h.delivery_pids().into_iter().map(|p| own(Some(p))).sum();
                v.push(("herald delivery", delivery));
                v.push(("nats-server", own(h.nats_pid)));
            }
            System::Postfix => {
                let p = self.postfix.expect("postfix relay");
                let live: u64 = p.pids().into_iter().map(|pid| own(Some(pid))).sum();
                let reaped = p.master_pid().and_then(cpu_ticks).map_or(0, |(_, c)| c);
                v.push(("postfix (all processes)", live + reaped));
            }
        }
        v.push(("smtp-sink", own(Some(self.sink.pid()))));
        v.push(("smtp-source", self_children_ticks()));
        v
    }
}

// ---------------------------------------------------------------------------------------
// One figure

struct Figure {
    system: System,
    sent: usize,
    /// Files at the sink.
    arrived: usize,
    /// Distinct Message-Ids among them.
    unique: usize,
    /// Files with a DKIM-Signature header.
    signed: usize,
    /// Files shorter than the payload.
    short: usize,
    /// smtp-source start to its exit (every message answered 250).
    accept_secs: f64,
    /// smtp-source start to the last message at the sink.
    e2e_secs: f64,
    /// CPU seconds per 1,000 messages, per process.
    cpu: Vec<(&'static str, f64)>,
    /// CPU seconds per 1,000 messages of the whole machine, and its utilisation (0..1 of
    /// all CPUs) while the figure ran.
    machine_cpu: f64,
    utilisation: f64,
    /// NATS messages in and out of nats-server per message (Herald only).
    nats_msgs: Option<(f64, f64)>,
    /// smtp-source's failure, or a stall.
    error: Option<String>,
}

impl Figure {
    fn rate(&self) -> f64 {
        self.unique as f64 / self.e2e_secs
    }

    fn accept_rate(&self) -> f64 {
        self.sent as f64 / self.accept_secs
    }

    fn ok(&self) -> bool {
        self.error.is_none() && self.arrived == self.sent && self.unique == self.sent
    }
}

#[allow(clippy::too_many_arguments)]
fn run_figure(
    scenario: &Scenario,
    acct: &Accounting,
    target: SocketAddr,
    n: usize,
    size: usize,
    sessions: usize,
    clk: f64,
    label: &str,
) -> Figure {
    let sink = acct.sink;
    sink.clear();
    let log_path = scenario.dir().join(format!("smtp-source-{label}.log"));
    let log = File::create(&log_path).expect("smtp-source log");
    let nats_monitor = acct
        .herald
        .filter(|_| acct.system == System::Herald)
        .map(|h| h.nats_monitor);
    let nats_before = nats_monitor.and_then(nats_msgs);
    let before = acct.snapshot();
    let machine_before = machine_busy_ticks();
    let start = Instant::now();
    let mut source = Command::new(find_tool("smtp-source", &[]))
        .args(["-4", "-d"])
        .args(["-s", &sessions.to_string()])
        .args(["-m", &n.to_string()])
        .args(["-l", &size.to_string()])
        .args(["-M", "bench.test", "-f", SENDER, "-t", RECIPIENT])
        .arg(target.to_string())
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("smtp-source log"))
        .stderr(log)
        .spawn()
        .expect("spawn smtp-source");
    let mut accepted: Option<(f64, bool)> = None;
    let mut last = (0usize, Instant::now());
    let mut error = None;
    let e2e_secs = loop {
        if accepted.is_none()
            && let Some(status) = source.try_wait().expect("wait for smtp-source")
        {
            accepted = Some((start.elapsed().as_secs_f64(), status.success()));
        }
        let count = sink.count();
        let now = Instant::now();
        if count != last.0 {
            last = (count, now);
        }
        match accepted {
            // smtp-sink creates a file when a transaction starts: the last ones may still
            // be receiving their data.
            Some((_, true)) if count >= n && sink.complete(size) => {
                break start.elapsed().as_secs_f64();
            }
            Some((_, false)) if now - last.1 > Duration::from_secs(10) => {
                break (last.1 - start).as_secs_f64();
            }
            _ => {}
        }
        if now - last.1 > STALL {
            error = Some(format!("no new message at the sink for {STALL:?}"));
            break (last.1 - start).as_secs_f64();
        }
        // Poll often enough for a 1% resolution, rarely enough not to load the box.
        let every =
            (start.elapsed() / 100).clamp(Duration::from_millis(5), Duration::from_millis(500));
        std::thread::sleep(every);
    };
    if accepted.is_none() {
        let _ = source.kill();
        let status = source.wait().expect("wait for smtp-source");
        accepted = Some((start.elapsed().as_secs_f64(), status.success()));
    }
    let (accept_secs, source_ok) = accepted.expect("set above");
    if !source_ok {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(3).collect();
        let msg = format!(
            "smtp-source failed: {}",
            tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
        );
        error = Some(match error {
            Some(e) => format!("{msg}; {e}"),
            None => msg,
        });
    }
    let after = acct.snapshot();
    let nats_msgs =
        nats_before
            .zip(nats_monitor.and_then(nats_msgs))
            .map(|((i0, o0), (i1, o1))| {
                (
                    i1.saturating_sub(i0) as f64 / n as f64,
                    o1.saturating_sub(o0) as f64 / n as f64,
                )
            });
    let machine_ticks = machine_busy_ticks().saturating_sub(machine_before) as f64;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let utilisation = machine_ticks / clk / (start.elapsed().as_secs_f64() * cpus);
    let cpu = before
        .iter()
        .zip(&after)
        .map(|((name, b), (_, a))| (*name, a.saturating_sub(*b) as f64 / clk / n as f64 * 1000.0))
        .collect();
    let (arrived, unique, signed, short) = inspect(sink, size);
    sink.clear();
    Figure {
        system: acct.system,
        sent: n,
        arrived,
        unique,
        signed,
        short,
        accept_secs,
        e2e_secs,
        cpu,
        machine_cpu: machine_ticks / clk / n as f64 * 1000.0,
        utilisation,
        nats_msgs,
        error,
    }
}

/// (files, distinct Message-Ids, files with a DKIM-Signature, files shorter than `size`),
/// reading only the head of each file.
fn inspect(sink: &Sink, size: usize) -> (usize, usize, usize, usize) {
    let files = sink.files();
    let mut ids = HashSet::new();
    let (mut signed, mut short) = (0, 0);
    let mut buf = vec![0u8; 16 * 1024];
    for f in &files {
        let Ok(mut file) = File::open(f) else {
            continue;
        };
        if file.metadata().map_or(0, |m| m.len()) < min_file_len(size) {
            short += 1;
        }
        let n = file.read(&mut buf).unwrap_or(0);
        let head = String::from_utf8_lossy(&buf[..n]);
        let head = head.split("\r\n\r\n").next().unwrap_or("");
        let head = head.split("\n\n").next().unwrap_or("");
        let mut id = None;
        for line in head.lines() {
            let lower = line.to_ascii_lowercase();
            if lower.starts_with("dkim-signature:") {
                signed += 1;
            } else if lower.starts_with("message-id:") {
                id = Some(line[11..].trim().to_string());
            }
        }
        ids.insert(id.unwrap_or_else(|| f.display().to_string()));
    }
    (files.len(), ids.len(), signed, short)
}

/// Sends `n` messages and waits for them at the sink (connections, caches and JetStream
/// consumers warm); a failure here means the system is misconfigured.
fn warm_up(
    scenario: &Scenario,
    acct: &Accounting,
    target: SocketAddr,
    n: usize,
    size: usize,
    sessions: usize,
    clk: f64,
) -> Result<(), String> {
    if n == 0 {
        return Ok(());
    }
    let label = format!("{}-{size}-warmup", acct.system.name());
    let f = run_figure(
        scenario,
        acct,
        target,
        n,
        size,
        sessions.min(n),
        clk,
        &label,
    );
    if f.ok() {
        Ok(())
    } else {
        Err(format!(
            "warm-up of {} ({n} messages): {} arrived, {}",
            acct.system.name(),
            f.arrived,
            f.error.unwrap_or_else(|| "messages missing".into())
        ))
    }
}

// ---------------------------------------------------------------------------------------
// Accept latency: an open-loop client

/// One accepted message of a latency run.
#[derive(Clone, Copy)]
struct Sample {
    /// `EHLO` sent -> `250` after the end of DATA read (EHLO, MAIL, RCPT, DATA and the body
    /// are five round trips on a new connection; QUIT is not timed).
    accept: Duration,
    /// Due time on the schedule -> that `250`: also the wait for a free client thread, the
    /// TCP connect and the greeting.
    total: Duration,
    /// Due time -> the start of the connect (the client fell behind its schedule).
    late: Duration,
    /// Wall clock of the `250`, compared with the sink file's mtime.
    accepted_at: SystemTime,
    /// Wall clock just before the message (body and final dot) was written: unlike the
    /// `250`'s, taken while the client thread runs, so no scheduling delay of the client
    /// can shift it.
    data_sent_at: SystemTime,
}

struct LatencyRun {
    system: System,
    offered: f64,
    sent: usize,
    samples: Vec<Sample>,
    /// The first few failures, and how many there were.
    failures: (usize, Vec<String>),
    /// First due time -> last `250`.
    secs: f64,
    /// Accept (`250` read) -> sink file mtime, ms (Herald and Postfix only).
    delivered_ms: Vec<f64>,
    /// End of DATA sent -> sink file mtime, ms (Herald and Postfix only).
    sent_to_sink_ms: Vec<f64>,
    /// Whether the client threads could be given a higher priority (nice -10).
    reniced: bool,
    /// Accepted but not at the sink, and at the sink more than once.
    missing: usize,
    duplicates: usize,
    load: String,
}

/// The message of a latency run: headers (the id in `Message-ID` and `X-Bench-Id`) and
/// `size` bytes of body in 80-byte lines, dot-terminated.
fn latency_message(id: &str, body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(body.len() + 400);
    let _ = write!(
        m,
        "From: <{SENDER}>\r\nTo: <{RECIPIENT}>\r\nSubject: herald bench latency\r\n\
         Date: Sat, 28 Nov 2026 10:00:00 +0000\r\nMessage-ID: <{id}@bench.test>\r\n\
         X-Bench-Id: {id}\r\n\r\n"
    );
    m.extend_from_slice(body);
    m.extend_from_slice(b".\r\n");
    m
}

fn latency_body(size: usize) -> Vec<u8> {
    let mut body = Vec::with_capacity(size + 80);
    let mut line = 0usize;
    while body.len() + 2 < size {
        let n = (size - body.len() - 2).min(78);
        body.extend((0..n).map(|i| b'a' + ((i + line) % 26) as u8));
        body.extend_from_slice(b"\r\n");
        line += 1;
    }
    body
}

/// Reads one (possibly multi-line) reply; Err unless its code starts with `class`.
fn reply(reader: &mut BufReader<TcpStream>, class: u8, stage: &str) -> Result<(), String> {
    let mut text = String::new();
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) => return Err(format!("{stage}: connection closed after {text:?}")),
            Ok(_) => {}
            Err(e) => return Err(format!("{stage}: {e}")),
        }
        text.push_str(&line);
        if line.len() < 4 || line.as_bytes()[3] != b'-' {
            break;
        }
    }
    if text.as_bytes().first() == Some(&class) {
        Ok(())
    } else {
        Err(format!("{stage}: {}", text.trim_end()))
    }
}

/// One message on a new connection, plaintext, no AUTH (the bench account's
/// `clientNetworks` covers 127.0.0.0/8), no pipelining.
fn send_one(target: SocketAddr, message: &[u8], due: Instant) -> Result<Sample, String> {
    let start = Instant::now();
    let stream = TcpStream::connect_timeout(&target, Duration::from_secs(10))
        .map_err(|e| format!("connect: {e}"))?;
    let _ = stream.set_nodelay(true);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(60)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(60)));
    let mut reader = BufReader::new(stream.try_clone().map_err(|e| e.to_string())?);
    let mut w = &stream;
    reply(&mut reader, b'2', "greeting")?;
    let ehlo = Instant::now();
    for (cmd, class, stage) in [
        ("EHLO client.bench.test\r\n".to_string(), b'2', "EHLO"),
        (format!("MAIL FROM:<{SENDER}>\r\n"), b'2', "MAIL"),
        (format!("RCPT TO:<{RECIPIENT}>\r\n"), b'2', "RCPT"),
        ("DATA\r\n".to_string(), b'3', "DATA"),
    ] {
        w.write_all(cmd.as_bytes())
            .map_err(|e| format!("{stage}: {e}"))?;
        reply(&mut reader, class, stage)?;
    }
    let data_sent_at = SystemTime::now();
    w.write_all(message).map_err(|e| format!("message: {e}"))?;
    reply(&mut reader, b'2', "end of data")?;
    let done = Instant::now();
    let accepted_at = SystemTime::now();
    let _ = w.write_all(b"QUIT\r\n");
    let _ = reply(&mut reader, b'2', "QUIT");
    Ok(Sample {
        accept: done - ehlo,
        total: done.saturating_duration_since(due),
        late: start.saturating_duration_since(due),
        accepted_at,
        data_sent_at,
    })
}

/// Open loop: message `i` is due at `i / rate` s after the start, whatever happened to the
/// ones before; `threads` client threads take the next due message when free (so a slow
/// answer does not delay the schedule until all threads are busy). Returns the samples by
/// message index, the failures and the seconds from the first due time to the last 250.
#[allow(clippy::type_complexity)]
fn open_loop(
    target: SocketAddr,
    tag: &str,
    size: usize,
    n: usize,
    rate: f64,
    threads: usize,
) -> (Vec<Option<Sample>>, Vec<String>, f64, bool) {
    let body = latency_body(size);
    let next = AtomicUsize::new(0);
    let samples: Mutex<Vec<Option<Sample>>> = Mutex::new(vec![None; n]);
    let failures = Mutex::new(Vec::new());
    let threads = threads.min(n).max(1);
    let start = std::sync::Barrier::new(threads + 1);
    let t0: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let before = own_threads();
    let mut reniced = false;
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                start.wait();
                let t0 = *t0.get().expect("set before the barrier");
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        break;
                    }
                    let due = t0 + Duration::from_secs_f64(i as f64 / rate);
                    let message = latency_message(&format!("{tag}-{i}"), &body);
                    let now = Instant::now();
                    if due > now {
                        std::thread::sleep(due - now);
                    }
                    match send_one(target, &message, due) {
                        Ok(sample) => samples.lock().expect("samples")[i] = Some(sample),
                        Err(e) => failures
                            .lock()
                            .expect("failures")
                            .push(format!("#{i}: {e}")),
                    }
                }
            });
        }
        // The client's own scheduling delays should add as little as possible to the
        // figures on a busy box: its threads (not smtp-source, not this main thread) get
        // nice -10 when allowed.
        let tids: Vec<String> = own_threads()
            .difference(&before)
            .map(|t| t.to_string())
            .collect();
        reniced = !tids.is_empty()
            && Command::new("renice")
                .args(["-n", "-10", "-p"])
                .args(&tids)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
        let _ = t0.set(Instant::now() + Duration::from_millis(100));
        start.wait();
    });
    let samples = samples.into_inner().expect("samples");
    let last = samples
        .iter()
        .enumerate()
        .filter_map(|(i, s)| s.map(|s| Duration::from_secs_f64(i as f64 / rate) + s.total))
        .max()
        .unwrap_or_default();
    (
        samples,
        failures.into_inner().expect("failures"),
        last.as_secs_f64(),
        reniced,
    )
}

/// Thread ids of this process (`/proc/self/task`).
fn own_threads() -> HashSet<u32> {
    std::fs::read_dir("/proc/self/task")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse().ok()))
                .collect()
        })
        .unwrap_or_default()
}

/// `(X-Bench-Id, wall clock of the final dot)` of every message the [`StampSink`] took.
type Stamps = Mutex<Vec<(Option<String>, SystemTime)>>;

/// The latency runs' sink, in place of smtp-sink on the same address: a minimal SMTP server
/// (thread per connection; PIPELINING, 8BITMIME) that stamps each message with the wall
/// clock when its final dot arrives, before answering 250, and keeps its `X-Bench-Id`.
/// (smtp-sink's files cannot give that time: their mtime on tmpfs is coarse-grained here,
/// a few milliseconds behind the real time, and even earlier than the moment the data
/// was sent.)
struct StampSink {
    addr: SocketAddr,
    stamps: std::sync::Arc<Stamps>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    conns: std::sync::Arc<Mutex<Vec<TcpStream>>>,
    acceptor: Option<std::thread::JoinHandle<()>>,
}

impl StampSink {
    fn start(addr: SocketAddr) -> std::io::Result<StampSink> {
        let listener = std::net::TcpListener::bind(addr)?;
        let stamps = std::sync::Arc::new(Mutex::new(Vec::new()));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let conns = std::sync::Arc::new(Mutex::new(Vec::new()));
        let acceptor = {
            let (stamps, stop, conns) = (stamps.clone(), stop.clone(), conns.clone());
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    if let Ok(clone) = stream.try_clone() {
                        conns.lock().expect("conns").push(clone);
                    }
                    let stamps = stamps.clone();
                    std::thread::spawn(move || {
                        let _ = stamp_session(stream, &stamps);
                    });
                }
            })
        };
        Ok(StampSink {
            addr,
            stamps,
            stop,
            conns,
            acceptor: Some(acceptor),
        })
    }

    fn count(&self) -> usize {
        self.stamps.lock().expect("stamps").len()
    }

    fn take(&self) -> Vec<(Option<String>, SystemTime)> {
        std::mem::take(&mut *self.stamps.lock().expect("stamps"))
    }

    /// Waits until `n` messages arrived, or nothing new for [`STALL`].
    fn wait_for(&self, n: usize) {
        let mut last = (self.count(), Instant::now());
        while self.count() < n {
            if self.count() != last.0 {
                last = (self.count(), Instant::now());
            } else if last.1.elapsed() > STALL {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for StampSink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
        for c in self.conns.lock().expect("conns").drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }
}

fn stamp_session(stream: TcpStream, stamps: &Stamps) -> std::io::Result<()> {
    let _ = stream.set_nodelay(true);
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut w = &stream;
    w.write_all(b"220 stamp-sink.bench.test ESMTP\r\n")?;
    let mut line = Vec::new();
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line)? == 0 {
            return Ok(());
        }
        let verb = line
            .get(..4)
            .map(|v| v.to_ascii_uppercase())
            .unwrap_or_default();
        match &verb[..] {
            b"EHLO" => w.write_all(
                b"250-stamp-sink.bench.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n\
                  250 ENHANCEDSTATUSCODES\r\n",
            )?,
            b"HELO" => w.write_all(b"250 stamp-sink.bench.test\r\n")?,
            b"MAIL" | b"RCPT" | b"RSET" | b"NOOP" => w.write_all(b"250 2.0.0 Ok\r\n")?,
            b"QUIT" => {
                w.write_all(b"221 2.0.0 Bye\r\n")?;
                return Ok(());
            }
            b"DATA" => {
                w.write_all(b"354 End data with <CR><LF>.<CR><LF>\r\n")?;
                let mut id = None;
                let mut in_header = true;
                loop {
                    line.clear();
                    if reader.read_until(b'\n', &mut line)? == 0 {
                        return Ok(());
                    }
                    if line == b".\r\n" || line == b".\n" {
                        break;
                    }
                    if in_header {
                        if line == b"\r\n" || line == b"\n" {
                            in_header = false;
                        } else if let Some(v) = line.strip_prefix(b"X-Bench-Id:") {
                            id = Some(String::from_utf8_lossy(v).trim().to_string());
                        }
                    }
                }
                let at = SystemTime::now();
                stamps.lock().expect("stamps").push((id, at));
                w.write_all(b"250 2.0.0 Ok: queued\r\n")?;
            }
            _ => w.write_all(b"502 5.5.2 Error: command not recognized\r\n")?,
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn run_latency(
    system: System,
    sink: &StampSink,
    target: SocketAddr,
    size: usize,
    n: usize,
    rate: f64,
    threads: usize,
    label: &str,
) -> LatencyRun {
    sink.take();
    let load = loadavg();
    // Unique per run: Herald takes the same bytes from the same account within its
    // duplicate window for a client's retry, acknowledges them and queues nothing.
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    let run = RUNS.fetch_add(1, Ordering::Relaxed);
    let tag = format!("lat-{}-{size}-{label}{run}", system.name());
    let (samples, failures, secs, reniced) = open_loop(target, &tag, size, n, rate, threads);
    let accepted: Vec<(usize, Sample)> = samples
        .iter()
        .enumerate()
        .filter_map(|(i, s)| s.map(|s| (i, s)))
        .collect();
    sink.wait_for(accepted.len());
    let mut delivered_ms = Vec::new();
    let mut sent_to_sink_ms = Vec::new();
    let mut seen: HashMap<usize, usize> = HashMap::new();
    let prefix = format!("{tag}-");
    for (id, at) in sink.take() {
        let Some(i) = id
            .as_deref()
            .and_then(|id| id.strip_prefix(&prefix))
            .and_then(|i| i.parse::<usize>().ok())
        else {
            continue;
        };
        *seen.entry(i).or_default() += 1;
        if system != System::Ceiling
            && let Some(Some(s)) = samples.get(i)
        {
            let since = |t: SystemTime| match at.duration_since(t) {
                Ok(d) => d.as_secs_f64() * 1000.0,
                Err(e) => -e.duration().as_secs_f64() * 1000.0,
            };
            delivered_ms.push(since(s.accepted_at));
            sent_to_sink_ms.push(since(s.data_sent_at));
        }
    }
    let missing = accepted
        .iter()
        .filter(|(i, _)| !seen.contains_key(i))
        .count();
    let duplicates = seen.values().map(|&c| c.saturating_sub(1)).sum();
    let count = failures.len();
    LatencyRun {
        system,
        offered: rate,
        sent: n,
        samples: accepted.into_iter().map(|(_, s)| s).collect(),
        failures: (count, failures.into_iter().take(3).collect()),
        secs,
        delivered_ms,
        sent_to_sink_ms,
        reniced,
        missing,
        duplicates,
        load,
    }
}

/// The `q` quantile (0..1) of `v` by nearest rank; NaN when empty.
fn quantile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = (q * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

// ---------------------------------------------------------------------------------------
// Profile: perf record on the Herald processes during one extra figure

struct Profile {
    /// Figure label and its end-to-end rate (with perf attached).
    label: String,
    rate: f64,
    command: String,
    /// (process, samples line, top symbols, top DSOs)
    processes: Vec<(String, String, Vec<String>, Vec<String>)>,
}

/// `perf report` of `data`: its "# Samples" line and the first `top` entries.
fn perf_report(perf: &Path, data: &Path, sort: &str, top: usize) -> (String, Vec<String>) {
    let out = Command::new(perf)
        .arg("report")
        .arg("-i")
        .arg(data)
        .args(["--no-children", "--sort", sort, "--stdio", "-g", "none"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let samples = out
        .lines()
        .find(|l| l.starts_with("# Samples"))
        .map(|l| l.trim_start_matches("# ").to_string())
        .unwrap_or_default();
    let lines = out
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .take(top)
        .map(|l| {
            let mut words: Vec<&str> = l.split_whitespace().collect();
            while words.len() > 2 && words.last() == Some(&"-") {
                words.pop();
            }
            let l = words.join(" ");
            match l.char_indices().nth(140) {
                Some((cut, _)) => format!("{}…", &l[..cut]),
                None => l,
            }
        })
        .collect();
    (samples, lines)
}

#[allow(clippy::too_many_arguments)]
fn run_profile(
    opts: &Opts,
    scenario: &Scenario,
    acct: &Accounting,
    herald: &HeraldStack,
    size: usize,
    clk: f64,
    notes: &mut Vec<String>,
) -> Option<Profile> {
    let call_graph = opts.perf.as_deref()?;
    let perf = find_tool("perf", &[PathBuf::from("/usr/bin")]);
    // No PMU in most VMs: the cpu-clock software event works everywhere.
    let mut args: Vec<String> = ["record", "-e", "cpu-clock", "-F", "999"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    match call_graph {
        "dwarf" => args.extend(["--call-graph".into(), "dwarf,16384".into()]),
        _ => args.push("-g".into()),
    }
    args.extend(["--no-buildid-cache".into(), "-q".into()]);
    let command = format!("{} {} -p PID -o FILE", perf.display(), args.join(" "));
    let mut running = Vec::new();
    let procs = [
        ("herald ingress", herald.ingress.pid()),
        (
            "herald delivery",
            herald.deliveries.first().and_then(|d| d.pid()),
        ),
    ];
    for (name, pid) in procs {
        let Some(pid) = pid else { continue };
        let data = scenario.dir().join(format!(
            "perf-{}-{size}.data",
            name.trim_start_matches("herald ")
        ));
        let log = File::create(data.with_extension("log")).ok();
        match Command::new(&perf)
            .args(&args)
            .arg("-p")
            .arg(pid.to_string())
            .arg("-o")
            .arg(&data)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log.map_or(Stdio::null(), Stdio::from))
            .spawn()
        {
            Ok(child) => running.push((name, child, data)),
            Err(e) => notes.push(format!("perf record could not start: {e}")),
        }
    }
    if running.is_empty() {
        return None;
    }
    std::thread::sleep(Duration::from_millis(500));
    let label = format!("herald-{size}-perf");
    let f = run_figure(
        scenario,
        acct,
        herald.listen,
        opts.messages,
        size,
        opts.sessions,
        clk,
        &label,
    );
    eprintln!(
        "bench: {label}: {} at the sink, {:.0} msg/s end to end with perf attached (load {})",
        f.unique,
        f.rate(),
        loadavg()
    );
    let mut processes = Vec::new();
    for (name, mut child, data) in running {
        let _ = Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status();
        let _ = child.wait();
        let (samples, top) = perf_report(&perf, &data, "symbol", 15);
        let (_, dsos) = perf_report(&perf, &data, "dso", 6);
        if let Some(dir) = &opts.out_dir {
            let _ = std::fs::create_dir_all(dir);
            let full = Command::new(&perf)
                .arg("report")
                .arg("-i")
                .arg(&data)
                .args(["--no-children", "--sort", "symbol", "--stdio", "-g", "none"])
                .stderr(Stdio::null())
                .output()
                .map(|o| o.stdout)
                .unwrap_or_default();
            let file = dir.join(format!(
                "perf-{}-{size}.txt",
                name.trim_start_matches("herald ")
            ));
            let _ = std::fs::write(&file, full);
            eprintln!("bench: full perf report: {}", file.display());
        }
        if top.is_empty() {
            notes.push(format!(
                "perf report gave nothing for {name} ({size} bytes)"
            ));
        }
        processes.push((name.to_string(), samples, top, dsos));
    }
    Some(Profile {
        label,
        rate: f.rate(),
        command,
        processes,
    })
}

// ---------------------------------------------------------------------------------------
// One message size: all systems, interleaved repetitions

struct SizeResult {
    size: usize,
    figures: Vec<Figure>,
    /// (process, peak RSS KiB)
    rss: Vec<(String, u64)>,
    /// Problems that are not figures (warm-up failures, log errors).
    notes: Vec<String>,
    latency: Vec<LatencyRun>,
    /// Where the latency runs' rate came from.
    latency_rate_note: String,
    profile: Option<Profile>,
    /// (delivery processes, figures)
    scaling: Vec<(usize, Vec<Figure>)>,
    /// Load average when this size started and when it ended.
    load: (String, String),
}

/// The stderr line of a figure.
fn progress(label: &str, f: &Figure) {
    eprintln!(
        "bench: {label}: {} sent, {} at the sink ({} distinct), {:.0} msg/s end to end, \
         {:.0} msg/s accepted, machine {:.0}% busy, load {}{}",
        f.sent,
        f.arrived,
        f.unique,
        f.rate(),
        f.accept_rate(),
        f.utilisation * 100.0,
        loadavg(),
        f.error
            .as_deref()
            .map(|e| format!(" -- {e}"))
            .unwrap_or_default()
    );
}

fn run_size(opts: &Opts, size: usize, clk: f64) -> SizeResult {
    let load_start = loadavg();
    let scenario = Scenario::new(&format!("bench-{size}"));
    eprintln!(
        "bench: {} byte messages, scenario dir {}, load {load_start}",
        size,
        scenario.dir().display()
    );
    let mut sink = Sink::start(&scenario);
    let mut sink_rss = 0;
    let want = |s: System| opts.systems.contains(&s);
    let mut herald = want(System::Herald).then(|| {
        HeraldStack::start(
            &scenario,
            &sink,
            opts.concurrency,
            opts.max_delivery_processes(),
        )
    });
    let postfix =
        want(System::Postfix).then(|| Postfix::start_relay(&scenario, "relay", sink.addr));
    let mut notes = Vec::new();
    let mut live = Vec::new();
    for &system in &opts.systems {
        let acct = Accounting {
            system,
            sink: &sink,
            herald: herald.as_ref(),
            postfix: postfix.as_ref(),
        };
        let target = target(system, &sink, herald.as_ref(), postfix.as_ref());
        match warm_up(
            &scenario,
            &acct,
            target,
            opts.warmup,
            size,
            opts.sessions,
            clk,
        ) {
            Ok(()) => live.push(system),
            Err(e) => {
                eprintln!("bench: {e}");
                notes.push(e);
            }
        }
    }
    let mut figures = Vec::new();
    for rep in 1..=opts.reps {
        for &system in &live {
            let acct = Accounting {
                system,
                sink: &sink,
                herald: herald.as_ref(),
                postfix: postfix.as_ref(),
            };
            let target = target(system, &sink, herald.as_ref(), postfix.as_ref());
            let label = format!("{}-{size}-rep{rep}", system.name());
            let f = run_figure(
                &scenario,
                &acct,
                target,
                opts.messages,
                size,
                opts.sessions,
                clk,
                &label,
            );
            progress(&label, &f);
            figures.push(f);
        }
    }

    // Accept latency: every system at the same offered rate(s).
    let mut latency = Vec::new();
    let mut latency_rate_note = String::new();
    if opts.latency_messages > 0 && opts.latency_sizes.contains(&size) {
        // Half of a system's sustained rate: the lower of its accepted and end-to-end
        // medians (Herald acknowledges before it delivers: above its delivery rate, the
        // accept-to-delivered latency would only measure a growing backlog).
        let half = |system: System| {
            let figs: Vec<&Figure> = figures
                .iter()
                .filter(|f| f.system == system && f.ok())
                .collect();
            (!figs.is_empty()).then(|| {
                let e2e = median(&mut figs.iter().map(|f| f.rate()).collect::<Vec<_>>());
                let acc = median(&mut figs.iter().map(|f| f.accept_rate()).collect::<Vec<_>>());
                ((e2e.min(acc) / 2.0).max(1.0), acc, e2e)
            })
        };
        let mut rates = opts.latency_rates.clone();
        if !rates.is_empty() {
            latency_rate_note = "given with --latency-rate".into();
        } else if let Some((r, acc, e2e)) = half(System::Herald) {
            rates.push(r);
            latency_rate_note = format!(
                "{r:.0} msg/s is half of the lower of Herald's medians above (accepted {acc:.0}, \
                 end to end {e2e:.0} msg/s)"
            );
            // Every system is also measured at a load the slowest one sustains.
            if let Some((p, acc, e2e)) = half(System::Postfix).filter(|(p, ..)| *p < 0.9 * r) {
                rates.push(p);
                let _ = write!(
                    latency_rate_note,
                    "; {p:.0} msg/s is half of Postfix's (accepted {acc:.0}, end to end \
                     {e2e:.0} msg/s), a load every system here sustains"
                );
            }
        } else {
            notes.push(
                "latency: no Herald figure to take the rate from (give --latency-rate)".into(),
            );
        }
        // The stamping sink takes smtp-sink's address while the latency runs last. Herald
        // (5 s) and Postfix (2 s) first close their idle connections to smtp-sink, so that
        // no message goes to a connection whose server has gone.
        let stamp = if rates.is_empty() {
            None
        } else {
            std::thread::sleep(IDLE_CLOSE);
            sink_rss = peak_rss_kib(sink.pid()).unwrap_or(0);
            sink.stop();
            StampSink::start(sink.addr)
                .map_err(|e| {
                    notes.push(format!("latency: the stamping sink could not start: {e}"));
                    sink.start_again();
                })
                .ok()
        };
        for &rate in rates.iter().filter(|_| stamp.is_some()) {
            let stamp = stamp.as_ref().expect("filtered");
            for &system in &live {
                let target = target(system, &sink, herald.as_ref(), postfix.as_ref());
                // A short warm-up at the same rate: connections to the new sink, caches.
                let warm = (opts.latency_messages / 10).clamp(1, 200);
                let _ = run_latency(
                    system,
                    stamp,
                    target,
                    size,
                    warm,
                    rate,
                    opts.latency_connections,
                    "warm",
                );
                let run = run_latency(
                    system,
                    stamp,
                    target,
                    size,
                    opts.latency_messages,
                    rate,
                    opts.latency_connections,
                    "run",
                );
                let mut acc: Vec<f64> = run.samples.iter().map(|s| ms(s.accept)).collect();
                let mut del = run.delivered_ms.clone();
                let mut sent = run.sent_to_sink_ms.clone();
                eprintln!(
                    "bench: latency {} {size}: {} of {} accepted ({} missing at the sink) at \
                     {:.0} msg/s offered, \
                     EHLO->250 p50 {:.1} ms p99 {:.1} ms, end of data->sink p50 {:.1} ms \
                     p99 {:.1} ms, 250->sink p50 {:.1} ms p99 {:.1} ms, load {}",
                    system.name(),
                    run.samples.len(),
                    run.sent,
                    run.missing,
                    rate,
                    quantile(&mut acc, 0.5),
                    quantile(&mut acc, 0.99),
                    quantile(&mut sent, 0.5),
                    quantile(&mut sent, 0.99),
                    quantile(&mut del, 0.5),
                    quantile(&mut del, 0.99),
                    loadavg()
                );
                latency.push(run);
            }
        }
        if let Some(stamp) = stamp {
            std::thread::sleep(IDLE_CLOSE);
            drop(stamp);
            sink.start_again();
        }
    }

    let profile = match herald.as_ref() {
        Some(h) if opts.perf.is_some() && live.contains(&System::Herald) => {
            let acct = Accounting {
                system: System::Herald,
                sink: &sink,
                herald: Some(h),
                postfix: postfix.as_ref(),
            };
            run_profile(opts, &scenario, &acct, h, size, clk, &mut notes)
        }
        _ => None,
    };

    // Peak RSS before the scaling series (which adds delivery processes).
    let mut rss = Vec::new();
    if let Some(h) = &herald {
        for (name, pid) in [
            ("herald ingress", h.ingress.pid()),
            (
                "herald delivery",
                h.deliveries.first().and_then(|d| d.pid()),
            ),
            ("nats-server", h.nats_pid),
        ] {
            if let Some(kib) = pid.and_then(peak_rss_kib) {
                rss.push((name.to_string(), kib));
            }
        }
    }
    if let Some(p) = &postfix {
        // Many small processes sharing their libraries: the sum of their PSS (each shared
        // page divided among its users) now, not a sum of peaks.
        let pids = p.pids();
        let sum: u64 = pids.iter().filter_map(|&pid| pss_kib(pid)).sum();
        rss.push((
            format!(
                "postfix (sum of the PSS of its {} live processes at the end)",
                pids.len()
            ),
            sum,
        ));
    }
    if let Some(kib) = peak_rss_kib(sink.pid()) {
        rss.push(("smtp-sink".to_string(), kib.max(sink_rss)));
    }

    // Scaling: 1, 2, 4 ... delivery processes, each with `concurrency` workers.
    let mut scaling = Vec::new();
    let scaling_size = opts.scaling_size.unwrap_or(opts.sizes[0]);
    if opts.scaling() && size == scaling_size && live.contains(&System::Herald) {
        for &n in &opts.delivery_processes {
            let h = herald.as_mut().expect("herald stack");
            h.set_deliveries(&scenario, n);
            let acct = Accounting {
                system: System::Herald,
                sink: &sink,
                herald: herald.as_ref(),
                postfix: postfix.as_ref(),
            };
            let target = herald.as_ref().expect("herald stack").listen;
            if let Err(e) = warm_up(
                &scenario,
                &acct,
                target,
                opts.warmup,
                size,
                opts.sessions,
                clk,
            ) {
                eprintln!("bench: scaling, {n} delivery process(es): {e}");
                notes.push(format!("scaling, {n} delivery process(es): {e}"));
                continue;
            }
            let mut figs = Vec::new();
            for rep in 1..=opts.reps {
                let label = format!("herald-{size}-d{n}-rep{rep}");
                let f = run_figure(
                    &scenario,
                    &acct,
                    target,
                    opts.messages,
                    size,
                    opts.sessions,
                    clk,
                    &label,
                );
                progress(&label, &f);
                figs.push(f);
            }
            scaling.push((n, figs));
        }
    }

    if let Some(h) = &herald {
        notes.extend(log_problems("ingress", h.ingress.log_path()));
        for d in &h.deliveries {
            notes.extend(log_problems(d.name(), d.log_path()));
        }
    }
    SizeResult {
        size,
        figures,
        rss,
        notes,
        latency,
        latency_rate_note,
        profile,
        scaling,
        load: (load_start, loadavg()),
    }
}

fn target(
    system: System,
    sink: &Sink,
    herald: Option<&HeraldStack>,
    postfix: Option<&Postfix>,
) -> SocketAddr {
    match system {
        System::Ceiling => sink.addr,
        System::Herald => herald.expect("herald stack").listen,
        System::Postfix => postfix.expect("postfix relay").addr(),
    }
}

/// WARN and ERROR lines of a Herald log: how many, and the first few distinct messages.
fn log_problems(role: &str, log: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let bytes = text.len();
    let mut out = Vec::new();
    for level in ["ERROR", "WARN"] {
        let needle = format!("\"level\":\"{level}\"");
        let lines: Vec<&str> = text.lines().filter(|l| l.contains(&needle)).collect();
        if lines.is_empty() {
            continue;
        }
        let mut seen = Vec::new();
        for l in &lines {
            let msg = l
                .split("\"message\":\"")
                .nth(1)
                .and_then(|r| r.split('"').next())
                .unwrap_or(l)
                .to_string();
            if !seen.contains(&msg) {
                seen.push(msg);
            }
            if seen.len() == 3 {
                break;
            }
        }
        out.push(format!(
            "herald {role}: {} {level} line(s) in its log, e.g. {}",
            lines.len(),
            seen.join(" / ")
        ));
    }
    eprintln!("bench: herald {role} log: {bytes} bytes");
    out
}

// ---------------------------------------------------------------------------------------
// Report

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn spread(v: &[f64]) -> String {
    if v.len() < 2 {
        return "-".into();
    }
    let min = v.iter().cloned().fold(f64::INFINITY, f64::min);
    let max = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    format!("{min:.0}–{max:.0}")
}

fn size_label(size: usize) -> String {
    if size.is_multiple_of(1024) {
        format!("{} KiB", size / 1024)
    } else {
        format!("{size} B")
    }
}

fn report(opts: &Opts, results: &[SizeResult]) -> (String, bool) {
    let mut out = String::new();
    let mut all_ok = true;
    let _ = writeln!(
        out,
        "\n## Throughput (messages/second, counted at the sink)\n\n\
         {} message(s) per figure, {} session(s) with kept connections (smtp-source -d), \
         1 recipient, {} repetition(s); median and min–max over the repetitions.\n",
        opts.messages, opts.sessions, opts.reps
    );
    let _ = writeln!(
        out,
        "| size | system | end to end msg/s (median) | spread | accepted msg/s (median) | \
         at sink / sent | DKIM-signed |"
    );
    let _ = writeln!(out, "|---|---|---:|---:|---:|---:|---:|");
    let mut ratios = Vec::new();
    for r in results {
        let mut medians = Vec::new();
        for &system in &opts.systems {
            let figs: Vec<&Figure> = r.figures.iter().filter(|f| f.system == system).collect();
            if figs.is_empty() {
                let _ = writeln!(
                    out,
                    "| {} | {} | failed | | | | |",
                    size_label(r.size),
                    system.describe()
                );
                all_ok = false;
                continue;
            }
            let rates: Vec<f64> = figs.iter().map(|f| f.rate()).collect();
            let med = median(&mut rates.clone());
            let acc = median(&mut figs.iter().map(|f| f.accept_rate()).collect::<Vec<_>>());
            let arrived: usize = figs.iter().map(|f| f.unique).sum();
            let sent: usize = figs.iter().map(|f| f.sent).sum();
            let signed: usize = figs.iter().map(|f| f.signed).sum();
            all_ok &= figs.iter().all(|f| f.ok());
            medians.push((system, med));
            let _ = writeln!(
                out,
                "| {} | {} | {med:.0} | {} | {acc:.0} | {arrived} / {sent} | {} |",
                size_label(r.size),
                system.describe(),
                spread(&rates),
                if system == System::Herald {
                    signed.to_string()
                } else {
                    "-".into()
                }
            );
        }
        let get = |s: System| medians.iter().find(|(x, _)| *x == s).map(|(_, m)| *m);
        if let Some(h) = get(System::Herald) {
            let mut line = format!("- {}: ", size_label(r.size));
            let mut parts = Vec::new();
            if let Some(p) = get(System::Postfix) {
                parts.push(format!("Herald/Postfix = {:.2}", h / p));
            }
            if let Some(c) = get(System::Ceiling) {
                parts.push(format!("Herald/ceiling = {:.2}", h / c));
            }
            line.push_str(&parts.join(", "));
            ratios.push(line);
        }
    }
    if !ratios.is_empty() {
        let _ = writeln!(
            out,
            "\nRatios of the medians (end to end):\n\n{}",
            ratios.join("\n")
        );
    }

    // Accept latency
    if results.iter().any(|r| !r.latency.is_empty()) {
        let _ = writeln!(
            out,
            "\n## Accept latency (open loop, one new connection per message)\n\n\
             The bench's own client sends each message on a new plaintext connection (no AUTH: \
             the account's clientNetworks), on a fixed schedule (message i due at i/rate s, \
             {} client threads, each taking the next due message when free), one command at \
             a time. **EHLO→250** is from sending EHLO to the 250 after the end of DATA \
             (EHLO, MAIL, RCPT, DATA, body: five round trips; connect and greeting not \
             included); **due→250** adds the wait for a free thread, the TCP connect and the \
             greeting (no coordinated omission: it counts from the schedule). \
             During these runs smtp-sink gives its address to the bench's own stamping sink \
             (a minimal SMTP server that notes the wall clock when a message's final dot \
             arrives, before its 250; smtp-sink's file mtimes are coarse here, a few ms early). \
             **End of data→sink** is that stamp minus the wall clock just before the client \
             wrote the body and its final dot: the whole relay latency as the application \
             sees it. **250→sink** (accept to delivered) is the stamp minus the wall clock at \
             which the client read the 250: below zero when the relay delivered before its \
             250 reached the client. Each system first gets a warm-up of a tenth of the \
             messages (at most 200) at the same rate. The client threads run at nice -10 \
             (renice) so that their own scheduling delays on a shared box add as little as \
             possible. Same client, same schedule for every system; the ceiling's row (the \
             client straight into the stamping sink) is the client's and the wire's own \
             floor.\n",
            opts.latency_connections
        );
        for r in results.iter().filter(|r| !r.latency.is_empty()) {
            let _ = writeln!(
                out,
                "{}: {} message(s) per system and rate; {}.\n",
                size_label(r.size),
                r.latency.first().map_or(0, |l| l.sent),
                r.latency_rate_note
            );
        }
        let _ = writeln!(
            out,
            "| size | system | offered / achieved msg/s | accepted / sent | EHLO→250 p50 ms | \
             p99 | max | due→250 p99 ms | end of data→sink p50 ms | p99 | 250→sink p50 ms | \
             p99 | max | load at start |"
        );
        let _ = writeln!(
            out,
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
        );
        for r in results {
            for l in &r.latency {
                let mut acc: Vec<f64> = l.samples.iter().map(|s| ms(s.accept)).collect();
                let mut total: Vec<f64> = l.samples.iter().map(|s| ms(s.total)).collect();
                let mut del = l.delivered_ms.clone();
                let mut sent = l.sent_to_sink_ms.clone();
                let delivered = if l.system == System::Ceiling {
                    "- | - | - | - | -".to_string()
                } else {
                    format!(
                        "{:.1} | {:.1} | {:.1} | {:.1} | {:.1}",
                        quantile(&mut sent, 0.5),
                        quantile(&mut sent, 0.99),
                        quantile(&mut del, 0.5),
                        quantile(&mut del, 0.99),
                        quantile(&mut del, 1.0)
                    )
                };
                let _ = writeln!(
                    out,
                    "| {} | {} | {:.0} / {:.0} | {} / {} | {:.2} | {:.2} | {:.2} | {:.2} | \
                     {delivered} | {} |",
                    size_label(r.size),
                    if l.system == System::Ceiling {
                        "ceiling (client -> stamping sink)"
                    } else {
                        l.system.describe()
                    },
                    l.offered,
                    l.samples.len() as f64 / l.secs.max(1e-9),
                    l.samples.len(),
                    l.sent,
                    quantile(&mut acc, 0.5),
                    quantile(&mut acc, 0.99),
                    quantile(&mut acc, 1.0),
                    quantile(&mut total, 0.99),
                    l.load
                );
            }
        }
        if results.iter().flat_map(|r| &r.latency).any(|l| !l.reniced) {
            let _ = writeln!(
                out,
                "\nThe client threads could not be given nice -10 (renice failed): their own \
                 scheduling delays are in the figures."
            );
        }
        let late: Vec<String> = results
            .iter()
            .flat_map(|r| r.latency.iter().map(move |l| (r.size, l)))
            .filter_map(|(size, l)| {
                let max = l.samples.iter().map(|s| s.late).max()?;
                (max > Duration::from_millis(5)).then(|| {
                    format!(
                        "{} {}: the client started up to {:.1} ms behind its schedule (all \
                         {} threads busy, or the box too busy to run them)",
                        size_label(size),
                        l.system.name(),
                        ms(max),
                        opts.latency_connections
                    )
                })
            })
            .collect();
        if !late.is_empty() {
            let _ = writeln!(out, "\n{}", late.join("\n"));
        }
    }

    let _ = writeln!(
        out,
        "\n## Resources\n\nCPU seconds per 1,000 messages (utime + stime, median over the \
         repetitions; the sink and smtp-source are counted in each system's own figures):\n"
    );
    let _ = writeln!(out, "| size | system | process | CPU s / 1,000 msgs |");
    let _ = writeln!(out, "|---|---|---|---:|");
    for r in results {
        for &system in &opts.systems {
            let figs: Vec<&Figure> = r.figures.iter().filter(|f| f.system == system).collect();
            let Some(first) = figs.first() else {
                continue;
            };
            let mut total = Vec::new();
            for (i, (name, _)) in first.cpu.iter().enumerate() {
                let mut v: Vec<f64> = figs.iter().map(|f| f.cpu[i].1).collect();
                let _ = writeln!(
                    out,
                    "| {} | {} | {name} | {:.3} |",
                    size_label(r.size),
                    system.name(),
                    median(&mut v)
                );
            }
            for f in &figs {
                total.push(f.cpu.iter().map(|(_, c)| c).sum::<f64>());
            }
            let _ = writeln!(
                out,
                "| {} | {} | **all of the above** | **{:.3}** |",
                size_label(r.size),
                system.name(),
                median(&mut total)
            );
            let mut rest: Vec<f64> = figs
                .iter()
                .map(|f| f.machine_cpu - f.cpu.iter().map(|(_, c)| c).sum::<f64>())
                .collect();
            let mut busy: Vec<f64> = figs.iter().map(|f| f.utilisation * 100.0).collect();
            let _ = writeln!(
                out,
                "| {} | {} | rest of the machine (kernel threads, anything else; machine {:.0}% busy) | {:.3} |",
                size_label(r.size),
                system.name(),
                median(&mut busy),
                median(&mut rest)
            );
        }
    }
    let mut nats_lines = Vec::new();
    for r in results {
        let figs: Vec<(f64, f64)> = r
            .figures
            .iter()
            .filter(|f| f.system == System::Herald)
            .filter_map(|f| f.nats_msgs)
            .collect();
        if !figs.is_empty() {
            nats_lines.push(format!(
                "- {}: {:.1} in, {:.1} out",
                size_label(r.size),
                median(&mut figs.iter().map(|m| m.0).collect::<Vec<_>>()),
                median(&mut figs.iter().map(|m| m.1).collect::<Vec<_>>())
            ));
        }
    }
    if !nats_lines.is_empty() {
        let _ = writeln!(
            out,
            "\nNATS messages per relayed message (nats-server `/varz` in_msgs / out_msgs over a \
             Herald figure, median; publishes, JetStream API and KV requests and their \
             replies, acks, events, all counted):\n\n{}",
            nats_lines.join("\n")
        );
    }
    let _ = writeln!(
        out,
        "\nPeak RSS (VmHWM over the warm-up and every repetition of that size; Postfix: see \
         its row):\n"
    );
    let _ = writeln!(out, "| size | process | memory (MiB) |");
    let _ = writeln!(out, "|---|---|---:|");
    for r in results {
        for (name, kib) in &r.rss {
            let _ = writeln!(
                out,
                "| {} | {name} | {:.1} |",
                size_label(r.size),
                *kib as f64 / 1024.0
            );
        }
    }

    // Scaling
    for r in results.iter().filter(|r| !r.scaling.is_empty()) {
        let _ = writeln!(
            out,
            "\n## Scaling: delivery processes ({})\n\n\
             One ingress; 1, 2, 4 ... delivery processes on the same JetStream consumer, each \
             with delivery.concurrency {} (connection slots per (source, site) raised to \
             their total); {} message(s) per figure, {} repetition(s), run one after the \
             other after the figures above. The machine has {} CPU(s): more processes than \
             cores share them.\n",
            size_label(r.size),
            opts.concurrency,
            opts.messages,
            opts.reps,
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );
        let _ = writeln!(
            out,
            "| delivery processes | end to end msg/s (median) | spread | accepted msg/s \
             (median) | at sink / sent | CPU s / 1,000: delivery (all) | ingress | \
             nats-server | machine busy |"
        );
        let _ = writeln!(out, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for (n, figs) in &r.scaling {
            all_ok &= figs.iter().all(|f| f.ok());
            let rates: Vec<f64> = figs.iter().map(|f| f.rate()).collect();
            let cpu = |name: &str| {
                median(
                    &mut figs
                        .iter()
                        .filter_map(|f| f.cpu.iter().find(|(n, _)| *n == name).map(|(_, c)| *c))
                        .collect::<Vec<_>>(),
                )
            };
            let _ = writeln!(
                out,
                "| {n} | {:.0} | {} | {:.0} | {} / {} | {:.3} | {:.3} | {:.3} | {:.0}% |",
                median(&mut rates.clone()),
                spread(&rates),
                median(&mut figs.iter().map(|f| f.accept_rate()).collect::<Vec<_>>()),
                figs.iter().map(|f| f.unique).sum::<usize>(),
                figs.iter().map(|f| f.sent).sum::<usize>(),
                cpu("herald delivery"),
                cpu("herald ingress"),
                cpu("nats-server"),
                median(
                    &mut figs
                        .iter()
                        .map(|f| f.utilisation * 100.0)
                        .collect::<Vec<_>>()
                )
            );
        }
    }

    // Profiles
    for r in results {
        let Some(p) = &r.profile else { continue };
        let _ = writeln!(
            out,
            "\n## Profile ({}, one extra Herald figure: {:.0} msg/s end to end with perf \
             attached)\n\n`{}`, then `perf report --no-children --sort symbol --stdio -g none` \
             (self time; top entries) and `--sort dso`:\n",
            size_label(r.size),
            p.rate,
            p.command
        );
        let _ = writeln!(out, "<!-- figure {} -->", p.label);
        for (name, samples, top, dsos) in &p.processes {
            let _ = writeln!(out, "{name} ({samples}):\n\n```text");
            for l in top {
                let _ = writeln!(out, "{l}");
            }
            let _ = writeln!(out, "-- by DSO:");
            for l in dsos {
                let _ = writeln!(out, "{l}");
            }
            let _ = writeln!(out, "```\n");
        }
    }

    let mut problems = Vec::new();
    for r in results {
        for l in &r.latency {
            if l.failures.0 > 0 || l.missing > 0 || l.duplicates > 0 {
                all_ok = false;
                problems.push(format!(
                    "{} {} latency run: {} failure(s){}, {} accepted but missing at the sink, \
                     {} duplicate(s)",
                    size_label(r.size),
                    l.system.name(),
                    l.failures.0,
                    if l.failures.1.is_empty() {
                        String::new()
                    } else {
                        format!(" (e.g. {})", l.failures.1.join(" / "))
                    },
                    l.missing,
                    l.duplicates
                ));
            }
        }
        for f in r
            .figures
            .iter()
            .chain(r.scaling.iter().flat_map(|(_, v)| v))
        {
            if !f.ok() {
                problems.push(format!(
                    "{} {}: sent {}, {} file(s) at the sink, {} distinct, missing {}, \
                     duplicates {}{}",
                    size_label(r.size),
                    f.system.name(),
                    f.sent,
                    f.arrived,
                    f.unique,
                    f.sent.saturating_sub(f.unique),
                    f.arrived.saturating_sub(f.unique),
                    f.error
                        .as_deref()
                        .map(|e| format!(" ({e})"))
                        .unwrap_or_default()
                ));
            }
            if f.short > 0 {
                problems.push(format!(
                    "{} {}: {} file(s) at the sink shorter than the payload",
                    size_label(r.size),
                    f.system.name(),
                    f.short
                ));
            }
            if f.system == System::Herald && f.signed != f.arrived {
                problems.push(format!(
                    "{} herald: {} of {} message(s) without a DKIM-Signature",
                    size_label(r.size),
                    f.arrived - f.signed.min(f.arrived),
                    f.arrived
                ));
            }
        }
        problems.extend(r.notes.iter().cloned());
    }
    let _ = writeln!(out, "\n## Checks\n");
    if problems.is_empty() {
        let _ = writeln!(
            out,
            "Every message sent (throughput, latency and scaling runs) arrived at the sink \
             exactly once; every Herald message of the throughput figures carried a \
             DKIM-Signature; no WARN/ERROR in the Herald logs."
        );
    } else {
        for p in &problems {
            let _ = writeln!(out, "- {p}");
        }
    }
    (out, all_ok)
}

fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_else(|| "?".into());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{cpus} CPU(s), {model}, {:.1} GiB RAM, Linux {}",
        mem_kib as f64 / 1024.0 / 1024.0,
        kernel.trim()
    )
}

fn command_line(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .map(|o| {
            let s = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&s).trim().to_string()
        })
        .unwrap_or_else(|e| format!("<{cmd}: {e}>"))
}

fn main() {
    let opts = parse_opts();
    herald_e2e::require_netns();
    let clk = clk_tck();
    let herald = herald_bin();
    let nats = find_tool("nats-server", &[herald_e2e::venv_dir().join("bin")]);
    let mut head = String::new();
    let _ = writeln!(
        head,
        "# Herald benchmark{}\n",
        if opts.quick { " (quick)" } else { "" }
    );
    let _ = writeln!(
        head,
        "- date: {}",
        command_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"])
    );
    if herald.components().any(|c| c.as_os_str() == "debug") {
        let _ = writeln!(
            head,
            "- **DEBUG build of herald: a smoke test of the harness, not a measurement**"
        );
    }
    let _ = writeln!(head, "- machine: {}", machine());
    let _ = writeln!(
        head,
        "- commit: {}{}",
        command_line("git", &["rev-parse", "--short", "HEAD"]),
        if command_line("git", &["status", "--porcelain", "--untracked-files=no"]).is_empty() {
            ""
        } else {
            " with uncommitted changes"
        }
    );
    let _ = writeln!(
        head,
        "- load average (1/5/15 min) at the start: {}",
        loadavg()
    );
    let _ = writeln!(
        head,
        "- herald: {} ({})",
        herald.display(),
        command_line(&herald.display().to_string(), &["--version"])
    );
    let _ = writeln!(
        head,
        "- nats-server: {}; Postfix {}",
        command_line(&nats.display().to_string(), &["--version"]),
        command_line("postconf", &["-dh", "mail_version"])
    );
    let _ = writeln!(
        head,
        "- Herald: 1 ingress + 1 delivery process, JetStream R1 file storage, DKIM rsa-sha256 \
         (2048-bit), MX from dnsmasq, delivery.concurrency {}, \
         delivery.shaping.default.max_connections {} (connections reused per (source, \
         site), default max_messages_per_connection), RUST_LOG={}",
        opts.concurrency,
        (opts.concurrency * opts.max_delivery_processes()).max(32),
        std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into())
    );
    let _ = writeln!(
        head,
        "- Postfix: relayhost = [sink], mynetworks 127.0.0.0/8, otherwise the defaults \
         (queue on disk, fsync before 250)"
    );
    let _ = writeln!(
        head,
        "- sink: smtp-sink, one file per message on tmpfs (/dev/shm), counted there; \
         smtp-source, smtp-sink, Herald, nats-server and Postfix all share the same CPUs"
    );
    print!("{head}");
    let started = Instant::now();
    let mut results = Vec::new();
    for &size in &opts.sizes {
        results.push(run_size(&opts, size, clk));
    }
    let (body, ok) = report(&opts, &results);
    println!("{body}");
    for r in &results {
        println!(
            "Load average (1/5/15 min) during the {} runs: {} at the start, {} at the end.",
            size_label(r.size),
            r.load.0,
            r.load.1
        );
    }
    println!(
        "Run took {:.0} s (startup, warm-ups and checks included).",
        started.elapsed().as_secs_f64()
    );
    if !ok {
        eprintln!("bench: some figures failed or lost messages (see Checks)");
        std::process::exit(1);
    }
}
