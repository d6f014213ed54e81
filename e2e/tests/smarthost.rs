//! Smarthost routes: an account that sends everything through an upstream relay requiring
//! STARTTLS and AUTH (aiosmtpd), and a route whose certificate cannot be verified.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    thread,
    time::Duration,
};

use herald_e2e::{Scenario, World, WorldOptions, require_netns, self_signed_cert, wait_until};

/// The aiosmtpd upstream, killed on drop.
struct Smarthost {
    child: Child,
    addr: SocketAddr,
    dir: PathBuf,
    /// Owns the temp dir the messages are written to.
    _scenario: Scenario,
}

impl Smarthost {
    fn start(scenario: Scenario) -> Smarthost {
        let addr = SocketAddr::from((scenario.ip(), scenario.port()));
        let (cert, key) = self_signed_cert(&scenario.subdir("smarthost-tls"));
        let dir = scenario.subdir("smarthost-mail");
        let python = herald_e2e::venv_dir().join("bin/python");
        let script = herald_e2e::workspace_root().join("e2e/tools/smarthost.py");
        let mut child = Command::new(python)
            .arg(script)
            .args([
                "--host",
                &addr.ip().to_string(),
                "--port",
                &addr.port().to_string(),
            ])
            .arg("--cert")
            .arg(&cert)
            .arg("--key")
            .arg(&key)
            .args(["--user", "relayuser", "--password", "relaypass"])
            .arg("--dir")
            .arg(&dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start aiosmtpd (scripts/install-deps.sh installs it)");
        let mut line = String::new();
        let stdout = child.stdout.take().expect("stdout");
        BufReader::new(stdout).read_line(&mut line).expect("read");
        assert_eq!(line.trim(), "ready", "aiosmtpd did not start");
        Smarthost {
            child,
            addr,
            dir,
            _scenario: scenario,
        }
    }

    fn messages(&self) -> Vec<String> {
        std::fs::read_dir(&self.dir)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter(|e| e.path().extension().is_some_and(|x| x == "eml"))
                    .filter_map(|e| std::fs::read_to_string(e.path()).ok())
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Smarthost {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn world_through(name: &str, upstream: &Smarthost, trust_any: bool) -> World {
    World::start_with(
        name,
        WorldOptions {
            account_spec: Some(format!(
                "{{smarthost: {{host: '{}', port: {}, tls: starttls, credentialsSecret: relay-auth, trustAnyCertificate: {trust_any}}}}}",
                upstream.addr.ip(),
                upstream.addr.port()
            )),
            extra_documents: vec![
                "{apiVersion: v1, kind: Secret, metadata: {name: relay-auth, namespace: default, \
                 labels: {herald.dev/smtpaccount: app}}, stringData: {username: relayuser, password: relaypass}}"
                    .into(),
            ],
            ..Default::default()
        },
    )
}

#[test]
fn smarthost_route_with_starttls_and_auth_delivers_through_the_upstream() {
    require_netns();
    let upstream = Smarthost::start(Scenario::new("smarthost-up"));
    let world = world_through("smarthost", &upstream, true);
    world.submit("smarthost-marker");
    let got = wait_until(Duration::from_secs(30), Duration::from_millis(200), || {
        upstream
            .messages()
            .into_iter()
            .find(|m| m.contains("smarthost-marker"))
    })
    .unwrap_or_else(|| panic!("nothing reached the smarthost\n{}", world.logs()));
    assert!(got.contains("X-Smarthost-Auth: relayuser"), "{got}");
    assert!(got.contains("X-Smarthost-TLS: yes"), "{got}");
    assert!(
        got.contains("DKIM-Signature:"),
        "signed before it leaves: {got}"
    );
    thread::sleep(Duration::from_secs(2));
    assert_eq!(
        world.arrived("smarthost-marker"),
        0,
        "went to the MX instead of the route"
    );
}

#[test]
fn smarthost_with_an_unverifiable_certificate_defers_instead_of_sending() {
    require_netns();
    let upstream = Smarthost::start(Scenario::new("smarthost-strict-up"));
    let world = world_through("smarthost-strict", &upstream, false);
    world.submit("strict-marker");
    let deferred = wait_until(Duration::from_secs(20), Duration::from_millis(200), || {
        let log = world.delivery.log();
        (log.contains("\"deferred\"") && log.contains("smarthost")).then_some(log)
    });
    let log = deferred.unwrap_or_else(|| panic!("no deferral\n{}", world.logs()));
    assert!(
        log.to_lowercase().contains("certificate"),
        "the reason names the certificate:\n{log}"
    );
    assert!(
        upstream.messages().is_empty(),
        "sent despite an unverified certificate"
    );
    assert_eq!(world.arrived("strict-marker"), 0);
}
