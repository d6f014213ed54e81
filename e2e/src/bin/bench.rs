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
//! ```text
//! bench [--quick] [--messages N] [--reps R] [--sessions S] [--sizes 10240,102400]
//!       [--warmup W] [--systems ceiling,herald,postfix] [--delivery-concurrency C]
//! ```

use std::collections::HashSet;
use std::fmt::Write as _;
use std::fs::File;
use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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
    /// `delivery.concurrency` of the Herald delivery process.
    concurrency: usize,
}

fn usage() -> ! {
    eprintln!(
        "usage: bench [--quick] [--messages N] [--reps R] [--sessions S] [--warmup W] \
         [--delivery-concurrency C] \
         [--sizes BYTES,BYTES] [--systems ceiling,herald,postfix]"
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
            "--sizes" => {
                o.sizes = value()
                    .split(',')
                    .map(|s| s.trim().parse().unwrap_or_else(|_| usage()))
                    .collect()
            }
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
    if o.messages == 0 || o.reps == 0 || o.sessions == 0 || o.sizes.is_empty() {
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

// ---------------------------------------------------------------------------------------
// smtp-sink

/// `smtp-sink -d DIR/...` on `<unique ip>:2525`: one file per transaction in `dir` (on
/// /dev/shm when it exists).
struct Sink {
    child: Child,
    addr: SocketAddr,
    dir: PathBuf,
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
        let log = File::create(scenario.dir().join("smtp-sink.log")).expect("sink log");
        let child = Command::new(find_tool("smtp-sink", &[]))
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
            .expect("spawn smtp-sink");
        let mut sink = Sink {
            child,
            addr,
            dir,
            _tmp: tmp,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_err() {
            if Instant::now() > deadline || sink.child.try_wait().ok().flatten().is_some() {
                panic!("smtp-sink did not start on {addr}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        sink
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
    delivery: Herald,
    nats_pid: Option<u32>,
    listen: SocketAddr,
    _dns: Dns,
    _nats: Nats,
}

impl HeraldStack {
    fn start(scenario: &Scenario, sink: &Sink, concurrency: usize) -> HeraldStack {
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
        let delivery_env = env(&[
            ("HERALD_DELIVERY__CONCURRENCY", &concurrency.to_string()),
            ("HERALD_DELIVERY__SMTP_PORT", &sink.addr.port().to_string()),
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
            delivery,
            nats_pid,
            listen,
            _dns: dns,
            _nats: nats,
        }
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
                v.push(("herald delivery", own(h.delivery.pid())));
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
// One message size: all systems, interleaved repetitions

struct SizeResult {
    size: usize,
    figures: Vec<Figure>,
    /// (process, peak RSS KiB)
    rss: Vec<(String, u64)>,
    /// Problems that are not figures (warm-up failures, log errors).
    notes: Vec<String>,
}

fn run_size(opts: &Opts, size: usize, clk: f64) -> SizeResult {
    let scenario = Scenario::new(&format!("bench-{size}"));
    eprintln!(
        "bench: {} byte messages, scenario dir {}",
        size,
        scenario.dir().display()
    );
    let sink = Sink::start(&scenario);
    let want = |s: System| opts.systems.contains(&s);
    let herald =
        want(System::Herald).then(|| HeraldStack::start(&scenario, &sink, opts.concurrency));
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
            eprintln!(
                "bench: {label}: {} sent, {} at the sink ({} distinct), {:.0} msg/s end to end, \
                 {:.0} msg/s accepted{}",
                f.sent,
                f.arrived,
                f.unique,
                f.rate(),
                f.accept_rate(),
                f.error
                    .as_deref()
                    .map(|e| format!(" -- {e}"))
                    .unwrap_or_default()
            );
            figures.push(f);
        }
    }
    let mut rss = Vec::new();
    if let Some(h) = &herald {
        for (name, pid) in [
            ("herald ingress", h.ingress.pid()),
            ("herald delivery", h.delivery.pid()),
            ("nats-server", h.nats_pid),
        ] {
            if let Some(kib) = pid.and_then(peak_rss_kib) {
                rss.push((name.to_string(), kib));
            }
        }
        for (role, log) in [
            ("ingress", h.ingress.log_path()),
            ("delivery", h.delivery.log_path()),
        ] {
            notes.extend(log_problems(role, log));
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
        rss.push(("smtp-sink".to_string(), kib));
    }
    SizeResult {
        size,
        figures,
        rss,
        notes,
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

    let mut problems = Vec::new();
    for r in results {
        for f in &r.figures {
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
            "Every message sent arrived at the sink exactly once; every Herald message \
             carried a DKIM-Signature; no WARN/ERROR in the Herald logs."
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
         (2048-bit), MX from dnsmasq, delivery.concurrency {}, RUST_LOG={}",
        opts.concurrency,
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
    println!(
        "Run took {:.0} s (startup, warm-ups and checks included).",
        started.elapsed().as_secs_f64()
    );
    if !ok {
        eprintln!("bench: some figures failed or lost messages (see Checks)");
        std::process::exit(1);
    }
}
