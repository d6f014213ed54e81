//! swaks, the SMTP client playing the application that submits mail.

use std::fmt::Display;
use std::process::Command;
use std::time::Duration;

use crate::find_tool;
use crate::process::run;

/// The outcome of one swaks run. Exit codes: 0 ok, 2 cannot connect, 21 banner, 22 HELO,
/// 23 MAIL, 24 RCPT (none accepted), 25 DATA command, 26 after the body (end of data),
/// 28 AUTH, 29 TLS.
#[derive(Debug)]
pub struct SwaksOutput {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl SwaksOutput {
    /// stdout then stderr.
    pub fn text(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }

    /// True if the transcript holds `needle`.
    pub fn contains(&self, needle: &str) -> bool {
        self.stdout.contains(needle) || self.stderr.contains(needle)
    }

    /// The server's replies (lines swaks prints with `<-  `, `<~  `, `<** ` or `<~* `:
    /// plain, TLS, error over plain, error over TLS), without that prefix.
    pub fn replies(&self) -> Vec<String> {
        self.text()
            .lines()
            .filter_map(|l| {
                ["<~* ", "<** ", "<~  ", "<-  "]
                    .iter()
                    .find_map(|p| l.strip_prefix(p))
                    .map(|r| r.trim().to_string())
            })
            .collect()
    }
}

/// Runs swaks with exactly these arguments (90 s limit for the whole run).
pub fn swaks(args: &[&str]) -> SwaksOutput {
    let out = run(
        Command::new(find_tool("swaks", &[])).args(args),
        None,
        Duration::from_secs(90),
    );
    SwaksOutput {
        code: out.code.unwrap_or(-1),
        stdout: out.stdout,
        stderr: out.stderr,
    }
}

/// A swaks command line under construction. Defaults: `--helo app.client.test`
/// (swaks would otherwise look up this machine's name) and `--timeout 60`.
#[derive(Clone, Debug)]
pub struct Swaks {
    args: Vec<String>,
}

impl Swaks {
    pub fn new(server: impl Display, port: u16) -> Swaks {
        Swaks {
            args: vec![
                "--server".into(),
                server.to_string(),
                "--port".into(),
                port.to_string(),
                "--helo".into(),
                "app.client.test".into(),
                "--timeout".into(),
                "60".into(),
            ],
        }
    }

    /// Any extra arguments.
    pub fn arg(mut self, arg: impl Into<String>) -> Swaks {
        self.args.push(arg.into());
        self
    }

    /// STARTTLS (`--tls`); swaks does not verify the certificate.
    pub fn starttls(self) -> Swaks {
        self.arg("--tls")
    }

    /// Implicit TLS (`--tls-on-connect`).
    pub fn tls_on_connect(self) -> Swaks {
        self.arg("--tls-on-connect")
    }

    pub fn auth_plain(self, user: &str, password: &str) -> Swaks {
        self.arg("--auth")
            .arg("PLAIN")
            .arg("--auth-user")
            .arg(user)
            .arg("--auth-password")
            .arg(password)
    }

    pub fn auth_login(self, user: &str, password: &str) -> Swaks {
        self.arg("--auth")
            .arg("LOGIN")
            .arg("--auth-user")
            .arg(user)
            .arg("--auth-password")
            .arg(password)
    }

    pub fn from(self, from: &str) -> Swaks {
        self.arg("--from").arg(from)
    }

    /// One or more recipients, comma-separated.
    pub fn to(self, to: &str) -> Swaks {
        self.arg("--to").arg(to)
    }

    /// An extra header line (`Name: value`), e.g. a Subject that marks the message.
    pub fn header(self, header: &str) -> Swaks {
        self.arg("--header").arg(header)
    }

    pub fn body(self, body: &str) -> Swaks {
        self.arg("--body").arg(body)
    }

    /// The whole message (headers and body) from a file.
    pub fn data_file(self, path: &std::path::Path) -> Swaks {
        self.arg("--data").arg(format!("@{}", path.display()))
    }

    pub fn args(&self) -> &[String] {
        &self.args
    }

    pub fn run(&self) -> SwaksOutput {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        swaks(&args)
    }
}
