//! Child processes owned by a handle: output to a log file, killed on drop.

use std::ffi::OsString;
use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::{read_lossy, tail};

/// How much of a log goes into a panic message.
pub(crate) const LOG_TAIL: usize = 12_000;

pub(crate) struct Managed {
    name: String,
    program: PathBuf,
    args: Vec<OsString>,
    envs: Vec<(String, String)>,
    log_path: PathBuf,
    child: Option<Child>,
    last_status: Option<ExitStatus>,
}

impl Managed {
    pub(crate) fn new(
        name: &str,
        program: PathBuf,
        args: Vec<OsString>,
        log_path: PathBuf,
    ) -> Managed {
        Managed {
            name: name.to_string(),
            program,
            args,
            envs: Vec::new(),
            log_path,
            child: None,
            last_status: None,
        }
    }

    pub(crate) fn env(mut self, key: &str, value: &str) -> Managed {
        self.envs.push((key.to_string(), value.to_string()));
        self
    }

    pub(crate) fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Starts the process (stdout and stderr appended to the log file).
    pub(crate) fn spawn(&mut self) {
        if self.is_running() {
            panic!("{} is already running", self.name);
        }
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .unwrap_or_else(|e| panic!("open {}: {e}", self.log_path.display()));
        let cmdline = std::iter::once(self.program.as_os_str())
            .chain(self.args.iter().map(|a| a.as_os_str()))
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ");
        writeln!(log, "=== e2e harness: starting {cmdline}")
            .unwrap_or_else(|e| panic!("write {}: {e}", self.log_path.display()));
        let stderr = log
            .try_clone()
            .unwrap_or_else(|e| panic!("dup {}: {e}", self.log_path.display()));
        let child = Command::new(&self.program)
            .args(&self.args)
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {} ({cmdline}): {e}", self.name));
        self.child = Some(child);
        self.last_status = None;
    }

    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Reaps the child if it has exited; true while it runs.
    pub(crate) fn is_running(&mut self) -> bool {
        let Some(child) = self.child.as_mut() else {
            return false;
        };
        match child.try_wait() {
            Ok(None) => true,
            Ok(Some(status)) => {
                self.last_status = Some(status);
                self.child = None;
                false
            }
            Err(e) => panic!("wait for {}: {e}", self.name),
        }
    }

    pub(crate) fn last_status(&self) -> Option<ExitStatus> {
        self.last_status
    }

    /// Sends a signal by name (`TERM`, `KILL`, `STOP`, ...) with kill(1).
    pub(crate) fn signal(&self, sig: &str) {
        if let Some(pid) = self.pid() {
            // The child is not reaped yet, so its pid cannot have been reused.
            send_signal(pid, sig);
        }
    }

    /// SIGKILL and reap.
    pub(crate) fn kill_9(&mut self) -> Option<ExitStatus> {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let status = child
                .wait()
                .unwrap_or_else(|e| panic!("wait for {}: {e}", self.name));
            self.last_status = Some(status);
        }
        self.last_status
    }

    /// SIGTERM, then SIGKILL if it has not exited within `grace`. Returns the exit status.
    pub(crate) fn terminate(&mut self, grace: Duration) -> Option<ExitStatus> {
        if !self.is_running() {
            return self.last_status;
        }
        self.signal("TERM");
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if !self.is_running() {
                return self.last_status;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "{} did not exit within {grace:?} of SIGTERM: SIGKILL",
            self.name
        );
        self.kill_9()
    }

    pub(crate) fn log(&self) -> String {
        read_lossy(&self.log_path)
    }

    pub(crate) fn log_tail(&self) -> String {
        tail(&self.log(), LOG_TAIL)
    }

    /// Polls `probe` until it succeeds; panics with the log if the process exits first or
    /// `timeout` passes.
    pub(crate) fn wait_ready(
        &mut self,
        what: &str,
        timeout: Duration,
        mut probe: impl FnMut() -> bool,
    ) {
        let start = Instant::now();
        loop {
            if !self.is_running() {
                let status = self
                    .last_status
                    .map_or_else(|| "unknown status".to_string(), |s| s.to_string());
                panic!(
                    "{} exited ({status}) before {what}; log {}:\n{}",
                    self.name,
                    self.log_path.display(),
                    self.log_tail()
                );
            }
            if probe() {
                return;
            }
            if start.elapsed() > timeout {
                panic!(
                    "{} not ready after {timeout:?} (waited for {what}); log {}:\n{}",
                    self.name,
                    self.log_path.display(),
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Managed {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `kill -s SIG PID` with the shell's builtin (no dependency on procps' kill(1)).
pub(crate) fn send_signal(pid: u32, sig: &str) {
    let _ = Command::new("sh")
        .args(["-c", "kill -s \"$1\" \"$2\" 2>/dev/null", "sh", sig])
        .arg(pid.to_string())
        .stdin(Stdio::null())
        .status();
}

/// True if something accepts TCP connections on `addr`.
pub(crate) fn tcp_accepts(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_ok()
}

/// Status code of a plain HTTP/1.0 GET (no HTTP crate needed for a health check).
pub(crate) fn http_get_status(addr: SocketAddr, path: &str) -> Option<u16> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    stream
        .set_write_timeout(Some(Duration::from_secs(3)))
        .ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let text = String::from_utf8_lossy(&response);
    let status_line = text.lines().next()?;
    let mut parts = status_line.split_whitespace();
    let version = parts.next()?;
    if !version.starts_with("HTTP/") {
        return None;
    }
    parts.next()?.parse().ok()
}

/// Output of a finished helper command.
pub(crate) struct Output {
    pub(crate) code: Option<i32>,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

/// Runs a short-lived command with optional stdin, killing it after `timeout`.
pub(crate) fn run(cmd: &mut Command, stdin: Option<&[u8]>, timeout: Duration) -> Output {
    let what = format!("{cmd:?}");
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    let writer = match (stdin, child.stdin.take()) {
        (Some(data), Some(mut pipe)) => {
            let data = data.to_vec();
            Some(std::thread::spawn(move || {
                let _ = pipe.write_all(&data);
            }))
        }
        _ => None,
    };
    let mut out_pipe = child.stdout.take().expect("stdout is piped");
    let mut err_pipe = child.stderr.take().expect("stderr is piped");
    let out_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = out_pipe.read_to_end(&mut buf);
        buf
    });
    let err_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = err_pipe.read_to_end(&mut buf);
        buf
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => panic!("wait for {what}: {e}"),
        }
    };
    if let Some(w) = writer {
        let _ = w.join();
    }
    let stdout = String::from_utf8_lossy(&out_reader.join().unwrap_or_default()).into_owned();
    let stderr = String::from_utf8_lossy(&err_reader.join().unwrap_or_default()).into_owned();
    if status.is_none() {
        panic!("{what} did not finish within {timeout:?}\nstdout:\n{stdout}\nstderr:\n{stderr}");
    }
    Output {
        code: status.and_then(|s| s.code()),
        stdout,
        stderr,
    }
}

/// Runs a command that must succeed; returns its stdout bytes.
pub(crate) fn run_ok_bytes(cmd: &mut Command, stdin: Option<&[u8]>) -> Vec<u8> {
    let what = format!("{cmd:?}");
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    if let (Some(data), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(data)
            .unwrap_or_else(|e| panic!("write stdin of {what}: {e}"));
    }
    let out = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("wait for {what}: {e}"));
    if !out.status.success() {
        panic!(
            "{what} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out.stdout
}

/// Is `pid` a live process (not gone, not a zombie)? Daemons such as Postfix's master are
/// reparented away from us, so a finished one may linger as a zombie nobody reaps.
pub(crate) fn pid_alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    match stat.rfind(')') {
        Some(i) => !matches!(stat[i + 1..].trim_start().chars().next(), Some('Z' | 'X')),
        None => false,
    }
}
