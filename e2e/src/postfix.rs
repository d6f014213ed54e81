//! A private Postfix 3.7 instance playing a recipient domain's MX.

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::dkim::self_signed_cert_named;
use crate::process::{LOG_TAIL, pid_alive, run, send_signal};
use crate::{Scenario, find_tool, read_lossy, set_mode, tail, unique_ip};

const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// Recipient-specific answers every instance gives (see `recipient_access`).
const RECIPIENT_ACCESS: &str = "\
/^tempfail@/ 450 4.2.0 Try again later
/^reject@/ 550 5.1.1 No such user
";

/// Postfix on `<unique 127.x.y.z>:25`, with its own config, queue and data dirs, storing
/// every message for every domain into one Maildir. STARTTLS is offered (self-signed
/// certificate); `tempfail@...` gets 450 4.2.0 and `reject@...` 550 5.1.1 at RCPT.
/// No DNS at all (`smtp_dns_support_level = disabled`, `smtpd_peername_lookup = no`),
/// except for [`Postfix::start_domain`], whose own mail leaves by MX lookups through the
/// scenario's resolver DNS. Stopped on drop.
pub struct Postfix {
    name: String,
    ip: Ipv4Addr,
    conf_dir: PathBuf,
    queue_dir: PathBuf,
    maildir: PathBuf,
    maillog: PathBuf,
    /// A `resolv.conf` bind-mounted over `/etc/resolv.conf` for this instance only.
    resolv_conf: Option<PathBuf>,
    running: bool,
}

/// What an instance is for.
enum Kind {
    /// Final destination for every domain, no DNS.
    Sink,
    /// Forwards everything to this host, no DNS.
    Relay(SocketAddr),
    /// Final destination for one domain; its own mail (bounces) goes out by DNS MX.
    Domain {
        domain: String,
        unknown: Vec<String>,
        nameserver: Ipv4Addr,
    },
}

impl Postfix {
    /// Configures and starts an instance named `name` (a subdir of the scenario), on a fresh
    /// loopback address; waits for its 220 banner.
    pub fn start(scenario: &Scenario, name: &str) -> Postfix {
        Postfix::start_with(scenario, name, Kind::Sink)
    }

    /// The MX of `domain` only, as a real site is: it accepts every local part at RCPT
    /// and stores the mail, except for the addresses in `unknown`, which it accepts and
    /// then bounces (`5.1.1`, virtual(8)'s "unknown user"): an asynchronous bounce, a DSN from
    /// the null sender to the envelope sender. That DSN, like anything else not for
    /// `domain`, leaves by DNS MX lookups through `nameserver:53` (the system resolver,
    /// pointed there by a `resolv.conf` bind-mounted for this instance only; see
    /// [`crate::Dns::start_for_resolver`]).
    pub fn start_domain(
        scenario: &Scenario,
        name: &str,
        domain: &str,
        unknown: &[&str],
        nameserver: Ipv4Addr,
    ) -> Postfix {
        Postfix::start_with(
            scenario,
            name,
            Kind::Domain {
                domain: domain.to_string(),
                unknown: unknown.iter().map(|u| u.to_string()).collect(),
                nameserver,
            },
        )
    }

    /// Like [`Postfix::start`], but a relay instead of a final destination: it stores
    /// nothing locally and forwards every message from `mynetworks` (127.0.0.0/8), for any
    /// domain, to `relayhost` (`relayhost = [ip]:port`, no DNS). No recipient-specific
    /// answers; everything else (TLS offered, logs, no DNS at all) is as for `start`. For
    /// the relay benchmark (`e2e/src/bin/bench.rs`).
    pub fn start_relay(scenario: &Scenario, name: &str, relayhost: SocketAddr) -> Postfix {
        Postfix::start_with(scenario, name, Kind::Relay(relayhost))
    }

    fn start_with(scenario: &Scenario, name: &str, kind: Kind) -> Postfix {
        let ip = unique_ip();
        let base = scenario.subdir(&format!("postfix-{name}"));
        let conf_dir = base.join("conf");
        let queue_dir = base.join("queue");
        let data_dir = base.join("data");
        let mail_base = base.join("mail");
        for d in [&conf_dir, &queue_dir, &data_dir, &mail_base] {
            std::fs::create_dir_all(d).unwrap_or_else(|e| panic!("create {}: {e}", d.display()));
            set_mode(d, 0o755);
        }
        let (uid, gid) = postfix_ids();
        chown(&data_dir, uid, gid);
        chown(&mail_base, uid, gid);
        let (cert, key) = self_signed_cert_named(&base, &format!("{name}.mx.test"));
        let access = conf_dir.join("recipient_access");
        write(&access, RECIPIENT_ACCESS);
        let maillog = base.join("maillog");
        let mailboxes = |domains: &str, maps: &str| {
            format!(
                "\
virtual_mailbox_domains = {domains}
virtual_mailbox_base = {mail}
virtual_mailbox_maps = {maps}
virtual_mailbox_limit = 0
virtual_minimum_uid = 1
virtual_uid_maps = static:{uid}
virtual_gid_maps = static:{gid}
",
                mail = mail_base.display(),
            )
        };
        let scripted = format!("check_recipient_access regexp:{}, ", access.display());
        // A final destination stores every domain into one Maildir and scripts answers per
        // recipient; a relay forwards everything to its relayhost; a domain's MX stores its
        // own domain's mail and sends the rest (its bounces) by DNS.
        let mut resolv_conf = None;
        let (destination, restrictions, dns_level) = match &kind {
            Kind::Sink => (
                mailboxes("static:ALL", "static:maildir/"),
                scripted,
                "disabled",
            ),
            Kind::Relay(relay) => (
                format!("relayhost = [{}]:{}\n", relay.ip(), relay.port()),
                String::new(),
                "disabled",
            ),
            Kind::Domain {
                domain,
                unknown,
                nameserver,
            } => {
                // Every address has a mailbox but the unknown ones; smtpd does not check
                // (smtpd_reject_unlisted_recipient = no), so those are accepted at RCPT and
                // bounced by virtual(8) ("unknown user", 5.1.1). An error(8) transport would
                // not do: smtpd refuses such addresses at RCPT already.
                let maps = conf_dir.join("mailboxes");
                let alternatives: Vec<String> = unknown.iter().map(|u| regex_escape(u)).collect();
                write(
                    &maps,
                    &format!("!/^({})$/ maildir/\n", alternatives.join("|")),
                );
                let resolv = base.join("resolv.conf");
                write(
                    &resolv,
                    &format!("nameserver {nameserver}\noptions timeout:2 attempts:2\n"),
                );
                resolv_conf = Some(resolv);
                (
                    format!(
                        "{}smtpd_reject_unlisted_recipient = no\n",
                        mailboxes(domain, &format!("regexp:{}", maps.display())),
                    ),
                    scripted,
                    "enabled",
                )
            }
        };
        let main_cf = format!(
            "\
compatibility_level = 3.6
queue_directory = {queue}
data_directory = {data}
mail_owner = postfix
myhostname = {name}.mx.test
mydomain = mx.test
myorigin = $myhostname
mydestination =
relay_domains =
alias_maps =
alias_database =
local_recipient_maps =
inet_interfaces = loopback-only
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
biff = no
smtpd_peername_lookup = no
smtp_dns_support_level = {dns_level}
{destination}smtpd_tls_security_level = may
smtpd_tls_cert_file = {cert}
smtpd_tls_key_file = {key}
smtpd_tls_loglevel = 1
smtpd_tls_received_header = yes
smtpd_recipient_restrictions = {restrictions}permit_mynetworks, reject_unauth_destination
maillog_file = {maillog}
maillog_file_prefixes = {base}
",
            queue = queue_dir.display(),
            data = data_dir.display(),
            cert = cert.display(),
            key = key.display(),
            maillog = maillog.display(),
            base = base.display(),
        );
        write(&conf_dir.join("main.cf"), &main_cf);
        let master_cf = format!(
            "\
{ip}:25      inet  n       -       n       -       -       smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"
        );
        write(&conf_dir.join("master.cf"), &master_cf);

        // Without a TTY Postfix's complaints are invisible: `script` gives it one.
        let check = run(
            Command::new("script").args([
                "-qec",
                &format!(
                    "{} -c '{}' check",
                    postfix_cmd().display(),
                    conf_dir.display()
                ),
                "/dev/null",
            ]),
            None,
            Duration::from_secs(60),
        );
        if check.code != Some(0) {
            panic!(
                "postfix check failed for {} ({:?}):\n{}{}",
                conf_dir.display(),
                check.code,
                check.stdout,
                check.stderr
            );
        }
        let mut pf = Postfix {
            name: name.to_string(),
            ip,
            conf_dir,
            queue_dir,
            maildir: mail_base.join("maildir"),
            maillog,
            resolv_conf,
            running: false,
        };
        pf.start_again();
        pf
    }

    /// The instance's address; it listens on port 25.
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// `ip:25`
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((self.ip, 25))
    }

    pub fn maildir(&self) -> &Path {
        &self.maildir
    }

    /// Every message stored so far (files in `new/` and `cur/`), oldest first.
    pub fn maildir_messages(&self) -> Vec<Vec<u8>> {
        let mut files = Vec::new();
        for sub in ["new", "cur"] {
            let dir = self.maildir.join(sub);
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue; // created on first delivery
            };
            for entry in entries {
                let entry = entry.unwrap_or_else(|e| panic!("read {}: {e}", dir.display()));
                files.push(entry.path());
            }
        }
        // Maildir names start with the delivery time in seconds, then a unique part.
        files.sort_by_key(|p| {
            let modified = std::fs::metadata(p).and_then(|m| m.modified()).ok();
            (modified, p.file_name().map(|n| n.to_os_string()))
        });
        files.iter().filter_map(|p| std::fs::read(p).ok()).collect()
    }

    /// Waits until at least `n` messages are stored and returns all of them; panics after
    /// `timeout` with what is there and the maillog.
    pub fn wait_for_messages(&self, n: usize, timeout: Duration) -> Vec<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        loop {
            let messages = self.maildir_messages();
            if messages.len() >= n {
                return messages;
            }
            if Instant::now() >= deadline {
                panic!(
                    "postfix {} ({}): {} message(s) in {} after {timeout:?}, expected {n}; maillog:\n{}",
                    self.name,
                    self.ip,
                    messages.len(),
                    self.maildir.display(),
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The instance's maillog.
    pub fn log(&self) -> String {
        read_lossy(&self.maillog)
    }

    pub fn log_tail(&self) -> String {
        tail(&self.log(), LOG_TAIL)
    }

    /// `postfix -c DIR stop`, then waits for the master to exit and kills any leftover
    /// process of this instance, so that its address is free again.
    pub fn stop(&mut self) {
        if !self.running {
            return;
        }
        self.running = false;
        let master = self.master_pid();
        let _ = run(
            Command::new(postfix_cmd())
                .arg("-c")
                .arg(&self.conf_dir)
                .arg("stop"),
            None,
            Duration::from_secs(30),
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        while master.is_some_and(pid_alive) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        self.kill_leftovers();
    }

    /// Starts the instance again after [`Postfix::stop`] (same address, queue, Maildir).
    pub fn start_again(&mut self) {
        assert!(!self.running, "postfix {} is already running", self.name);
        let mut command = match &self.resolv_conf {
            None => Command::new(postfix_cmd()),
            // The master and every daemon it forks live in this private mount namespace,
            // where /etc/resolv.conf names this instance's nameserver. scripts/netns.sh's
            // own bind mount there is of a deleted file, which cannot be mounted over: it
            // is taken off first (in this namespace only).
            Some(resolv) => {
                let mut c = Command::new(find_tool("unshare", &[]));
                c.args(["--mount", "--", "sh", "-c"])
                    .arg(
                        "umount /etc/resolv.conf 2>/dev/null; \
                         mount --bind \"$0\" /etc/resolv.conf && exec \"$@\"",
                    )
                    .arg(resolv)
                    .arg(postfix_cmd());
                c
            }
        };
        let out = run(
            command.arg("-c").arg(&self.conf_dir).arg("start"),
            None,
            Duration::from_secs(60),
        );
        if out.code != Some(0) {
            panic!(
                "postfix -c {} start failed ({:?}):\n{}{}\nmaillog:\n{}",
                self.conf_dir.display(),
                out.code,
                out.stdout,
                out.stderr,
                self.log_tail()
            );
        }
        self.running = true;
        let addr = self.addr();
        let deadline = Instant::now() + READY_TIMEOUT;
        while !smtp_banner(addr) {
            if Instant::now() >= deadline {
                panic!(
                    "postfix {} gives no 220 banner on {addr} after {READY_TIMEOUT:?}; maillog:\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Pid of the instance's master process (from its pid file), while it runs.
    pub fn master_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.queue_dir.join("pid/master.pid"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
    }

    /// Pids of every live process of this instance (master, smtpd, qmgr, ...): each carries
    /// `MAIL_CONFIG=<conf dir>` in its environment (Postfix passes it on).
    pub fn pids(&self) -> Vec<u32> {
        let needle = format!("MAIL_CONFIG={}", self.conf_dir.display());
        let Ok(procs) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        let mut pids = Vec::new();
        for entry in procs.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
                continue;
            };
            if environ
                .split(|b| *b == 0)
                .any(|var| var == needle.as_bytes())
                && pid_alive(pid)
            {
                pids.push(pid);
            }
        }
        pids
    }

    /// SIGKILL every process of this instance still alive (see [`Postfix::pids`]).
    fn kill_leftovers(&self) {
        for pid in self.pids() {
            send_signal(pid, "KILL");
        }
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Connects and reads a 220 greeting, then says QUIT.
fn smtp_banner(addr: SocketAddr) -> bool {
    let Ok(stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(300)) else {
        return false;
    };
    if stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .is_err()
    {
        return false;
    }
    let mut reader = BufReader::new(&stream);
    let mut line = String::new();
    let ok = reader.read_line(&mut line).is_ok() && line.starts_with("220");
    let _ = (&stream).write_all(b"QUIT\r\n");
    ok
}

/// `text` as a literal in a Postfix regexp table.
fn regex_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 2);
    for c in text.chars() {
        if "\\.+*?()|[]{}^$/".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn postfix_cmd() -> PathBuf {
    find_tool("postfix", &[PathBuf::from("/usr/sbin")])
}

fn postfix_ids() -> (u32, u32) {
    let id = |flag: &str| -> u32 {
        let out = run(
            Command::new("id").args([flag, "postfix"]),
            None,
            Duration::from_secs(10),
        );
        out.stdout
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("no user postfix (id {flag} postfix: {})", out.stderr))
    };
    (id("-u"), id("-g"))
}

fn chown(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .unwrap_or_else(|e| panic!("chown {uid}:{gid} {}: {e}", path.display()));
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}
