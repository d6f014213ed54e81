//! The `herald` binary under test, one process per role.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::process::{Managed, tcp_accepts};
use crate::{Scenario, workspace_root};

const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a role without a listener (delivery) must stay up to count as started.
const ALIVE_FOR: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Ingress,
    Delivery,
    Sink,
    Api,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Ingress => "ingress",
            Role::Delivery => "delivery",
            Role::Sink => "sink",
            Role::Api => "api",
        }
    }
}

/// `$HERALD_BIN`, else `<target dir>/debug/herald` (`$CARGO_TARGET_DIR` or `<root>/target`).
pub fn herald_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("HERALD_BIN").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    let target = if target.is_absolute() {
        target
    } else {
        workspace_root().join(target)
    };
    target.join("debug/herald")
}

/// `herald --config FILE <role>`, output to `<scenario>/herald-<name>.log`, killed on drop.
pub struct Herald {
    name: String,
    role: Role,
    ready_addr: Option<SocketAddr>,
    process: Managed,
}

impl Herald {
    /// Spawns and waits until ready: for a role with a listener (`ready_addr`, the ingress
    /// listener or the sink address), until it accepts TCP connections; otherwise until it
    /// has stayed up for a second.
    pub fn start(
        scenario: &Scenario,
        name: &str,
        role: Role,
        config: &Path,
        ready_addr: Option<SocketAddr>,
    ) -> Herald {
        let mut h = Herald::spawn(scenario, name, role, config, ready_addr);
        h.wait_ready();
        h
    }

    /// Like [`Herald::start`], with extra environment variables (e.g. `OTEL_*`).
    pub fn start_with_env(
        scenario: &Scenario,
        name: &str,
        role: Role,
        config: &Path,
        ready_addr: Option<SocketAddr>,
        env: &[(String, String)],
    ) -> Herald {
        let mut h = Herald::spawn_with_env(scenario, name, role, config, ready_addr, env);
        h.wait_ready();
        h
    }

    /// Several processes of one listener-less role (delivery pods) on the same config
    /// file, hence the same NATS: spawned together and then waited for, so that they are
    /// up at the same time. Each logs to `herald-<name>.log`; names must differ.
    pub fn start_several(
        scenario: &Scenario,
        names: &[&str],
        role: Role,
        config: &Path,
        env: &[(String, String)],
    ) -> Vec<Herald> {
        let mut all: Vec<Herald> = names
            .iter()
            .map(|name| Herald::spawn_with_env(scenario, name, role, config, None, env))
            .collect();
        for h in &mut all {
            h.wait_ready();
        }
        all
    }

    /// Spawns without waiting (for crash tests that kill it right away).
    pub fn spawn(
        scenario: &Scenario,
        name: &str,
        role: Role,
        config: &Path,
        ready_addr: Option<SocketAddr>,
    ) -> Herald {
        Herald::spawn_with_env(scenario, name, role, config, ready_addr, &[])
    }

    /// Spawns with extra environment variables, without waiting.
    pub fn spawn_with_env(
        scenario: &Scenario,
        name: &str,
        role: Role,
        config: &Path,
        ready_addr: Option<SocketAddr>,
        env: &[(String, String)],
    ) -> Herald {
        let bin = herald_bin();
        assert!(
            bin.is_file(),
            "herald binary {} missing: cargo build --ignore-rust-version -p herald (or set HERALD_BIN)",
            bin.display()
        );
        let args: Vec<OsString> = vec![
            "--config".into(),
            config.as_os_str().to_os_string(),
            role.as_str().into(),
        ];
        let rust_log = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_string());
        let mut process = Managed::new(
            &format!("herald {} ({name})", role.as_str()),
            bin,
            args,
            scenario.dir().join(format!("herald-{name}.log")),
        )
        .env("RUST_LOG", &rust_log)
        .env("RUST_BACKTRACE", "1");
        for (k, v) in env {
            process = process.env(k, v);
        }
        process.spawn();
        Herald {
            name: name.to_string(),
            role,
            ready_addr,
            process,
        }
    }

    pub fn wait_ready(&mut self) {
        match self.ready_addr {
            Some(addr) => {
                self.process
                    .wait_ready(&format!("TCP {addr} accepting"), READY_TIMEOUT, || {
                        tcp_accepts(addr)
                    })
            }
            None => {
                let since = Instant::now();
                self.process
                    .wait_ready("staying up for 1 s", READY_TIMEOUT, || {
                        since.elapsed() >= ALIVE_FOR
                    })
            }
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn role(&self) -> Role {
        self.role
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    pub fn is_running(&mut self) -> bool {
        self.process.is_running()
    }

    /// SIGKILL and reap: no chance to clean up, like a node dying.
    pub fn kill_9(&mut self) {
        self.process.kill_9();
    }

    /// SIGTERM and wait (SIGKILL after 20 s). Returns the exit status if there was one.
    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        self.process.terminate(Duration::from_secs(20))
    }

    /// Stops it if running (SIGTERM), then starts it again and waits until ready.
    pub fn restart(&mut self) {
        self.terminate();
        self.process.spawn();
        self.wait_ready();
    }

    /// Starts it again after [`Herald::kill_9`] / [`Herald::terminate`] and waits until ready.
    pub fn start_again(&mut self) {
        self.process.spawn();
        self.wait_ready();
    }

    /// Exit status of the last run, once it has exited.
    pub fn last_status(&self) -> Option<std::process::ExitStatus> {
        self.process.last_status()
    }

    /// Everything it printed so far (all runs, separated by `=== e2e harness:` lines).
    pub fn log(&self) -> String {
        self.process.log()
    }

    pub fn log_tail(&self) -> String {
        self.process.log_tail()
    }

    pub fn log_path(&self) -> &Path {
        self.process.log_path()
    }
}
