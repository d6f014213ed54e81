//! A real Python client: stdlib smtplib with STARTTLS and AUTH PLAIN (e2e/tools/submit.py)
//! submits a good message, one whose header From is outside the account's domains, and one
//! above the size limit; each gets the documented reply, and only the first is delivered.

use std::{process::Command, time::Duration};

use herald_e2e::{WORLD_ACCOUNT, WORLD_PASSWORD, World, WorldOptions, venv_dir, workspace_root};

const MAX_SIZE: usize = 100_000;

#[test]
fn python_smtplib_submits_and_hears_every_refusal_with_its_code() {
    let world = World::start_with(
        "smtplib",
        WorldOptions {
            ingress_env: vec![(
                "HERALD_INGRESS__MAX_MESSAGE_SIZE".to_string(),
                MAX_SIZE.to_string(),
            )],
            ..Default::default()
        },
    );
    let marker = format!("smtplib-{}", std::process::id());
    let out = Command::new(venv_dir().join("bin/python"))
        .arg(workspace_root().join("e2e/tools/submit.py"))
        .args(["--server", &world.submission.ip().to_string()])
        .args(["--port", &world.submission.port().to_string()])
        .args(["--user", WORLD_ACCOUNT, "--password", WORLD_PASSWORD])
        .args(["--sender", "app@example.test", "--to", "user@example.test"])
        .args(["--marker", &marker])
        .args(["--oversize", &(2 * MAX_SIZE).to_string()])
        .output()
        .expect("run e2e/tools/submit.py with the venv's python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}{stderr}");
    let result: serde_json::Value = stdout
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .and_then(|j| serde_json::from_str(j).ok())
        .unwrap_or_else(|| panic!("no RESULT line:\n{stdout}{stderr}\n{}", world.logs()));
    assert!(
        out.status.success(),
        "submit.py: {result:#}\n{}",
        world.logs()
    );

    let good = &result["good"];
    assert_eq!(good["code"], 250, "{result:#}");
    assert!(
        good["reply"]
            .as_str()
            .is_some_and(|r| r.starts_with("2.0.0 Ok: queued as ")),
        "{result:#}"
    );
    let foreign = &result["foreign-from"];
    assert_eq!(foreign["exception"], "SMTPDataError", "{result:#}");
    assert_eq!(foreign["code"], 550, "{result:#}");
    assert_eq!(
        foreign["reply"], "5.7.1 From header domain foreign.test is not allowed",
        "{result:#}"
    );
    let big = &result["oversize"];
    assert_eq!(big["exception"], "SMTPSenderRefused", "{result:#}");
    assert_eq!(big["code"], 552, "{result:#}");
    assert!(
        big["reply"]
            .as_str()
            .is_some_and(|r| r.starts_with("5.3.4")),
        "{result:#}"
    );

    world.wait_arrival(&format!("{marker} good"), Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(world.arrived(&marker), 1, "only the good message arrives");
}
