//! A single-node nats-server with JetStream, private to one scenario.

use std::ffi::OsString;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use crate::process::{Managed, http_get_status};
use crate::{Scenario, find_tool, free_port, venv_dir};

const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// `nats-server -a 127.0.0.1 -p PORT -m MONPORT -js -sd DIR`, killed on drop.
pub struct Nats {
    port: u16,
    monitor_port: u16,
    store_dir: PathBuf,
    process: Managed,
}

impl Nats {
    /// Starts nats-server (`$HERALD_NATS_SERVER`, else the venv's 2.15 build, else `PATH`)
    /// and waits until `/healthz?js-enabled-only=true` answers 200.
    pub fn start(scenario: &Scenario) -> Nats {
        let port = free_port();
        let monitor_port = free_port();
        let store_dir = scenario.subdir("nats");
        let program = match std::env::var_os("HERALD_NATS_SERVER") {
            Some(p) if !p.is_empty() => PathBuf::from(p),
            _ => find_tool("nats-server", &[venv_dir().join("bin")]),
        };
        let args: Vec<OsString> = vec![
            "-a".into(),
            "127.0.0.1".into(),
            "-p".into(),
            port.to_string().into(),
            "-m".into(),
            monitor_port.to_string().into(),
            "-js".into(),
            "-sd".into(),
            store_dir.clone().into_os_string(),
        ];
        let process = Managed::new(
            "nats-server",
            program,
            args,
            scenario.dir().join("nats.log"),
        );
        let mut nats = Nats {
            port,
            monitor_port,
            store_dir,
            process,
        };
        nats.start_again();
        nats
    }

    /// `nats://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn monitor_port(&self) -> u16 {
        self.monitor_port
    }

    pub fn store_dir(&self) -> &std::path::Path {
        &self.store_dir
    }

    /// True if the monitoring endpoint reports a healthy JetStream.
    pub fn healthy(&self) -> bool {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.monitor_port));
        http_get_status(addr, "/healthz?js-enabled-only=true") == Some(200)
    }

    /// SIGTERM (SIGKILL after 10 s) and wait until it has exited.
    pub fn stop(&mut self) {
        self.process.terminate(Duration::from_secs(10));
    }

    /// SIGKILL and wait.
    pub fn kill_9(&mut self) {
        self.process.kill_9();
    }

    /// Starts it again on the same ports with the same store dir (after [`Nats::stop`]),
    /// and waits for health.
    pub fn start_again(&mut self) {
        self.process.spawn();
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.monitor_port));
        self.process.wait_ready(
            "GET /healthz?js-enabled-only=true -> 200",
            READY_TIMEOUT,
            || http_get_status(addr, "/healthz?js-enabled-only=true") == Some(200),
        );
    }

    pub fn log(&self) -> String {
        self.process.log()
    }
}
