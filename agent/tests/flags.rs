//! `bramble-agent` refuses a bad configuration at start, with exit code 64 and a message
//! that names the flag, before it touches Docker, the network or its data directory.

use std::process::{Command, Output};

/// A well-formed join token (of no real cluster).
const TOKEN: &str =
    "BRAMBLE1-9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08-0123456789abcdef";

/// `bramble-agent` for node `pi-1` with `data_dir`, the well-formed join token in the
/// environment and nothing else from it; callers add the rest.
fn base(data_dir: &std::path::Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_bramble-agent"));
    cmd.args(["--node-name", "pi-1"])
        .arg("--data-dir")
        .arg(data_dir)
        .env("BRAMBLE_JOIN_TOKEN", TOKEN)
        .env_remove("BRAMBLE_JOIN_TOKEN_FILE")
        .env_remove("BRAMBLE_ALLOW_HOST_PATH")
        .env("BRAMBLE_LOG", "off");
    cmd
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("run bramble-agent")
}

fn agent(data_dir: &std::path::Path, args: &[&str]) -> Output {
    // Nothing is listening there: an agent that got past its checks would keep
    // redialling, and the test would time out instead of passing by accident.
    run(base(data_dir)
        .args(["--controller", "https://127.0.0.1:9"])
        .args(args))
}

#[test]
fn bad_host_path_prefixes_and_labels_are_refused_with_exit_64() {
    let labels: Vec<String> = (0..65).map(|i| format!("--label=k{i}=v")).collect();
    let long_value = format!("--label=disk={}", "x".repeat(254));
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--allow-host-path", "/"],
            "--allow-host-path \"/\": a system path",
        ),
        (
            vec!["--allow-host-path", "/etc/bramble"],
            "--allow-host-path \"/etc/bramble\": under the system path /etc",
        ),
        (
            vec![
                "--allow-host-path",
                "/srv/ok",
                "--allow-host-path",
                "/var/run",
            ],
            "--allow-host-path \"/var/run\": a system path",
        ),
        (
            vec!["--allow-host-path", "volumes"],
            "--allow-host-path \"volumes\": not an absolute path",
        ),
        (vec!["--allow-host-path", "/srv/a:/etc"], "contains ':'"),
        (
            vec!["--allow-host-path", "/srv/../etc"],
            "has a '..' segment",
        ),
        (
            vec!["--label", "bad key=v"],
            "node label \"bad key\": invalid label key",
        ),
        (
            vec![long_value.as_str()],
            "node label \"disk\": invalid label value",
        ),
        (
            labels.iter().map(String::as_str).collect(),
            "65 labels, more than the limit of 64",
        ),
    ];
    for (args, want) in cases {
        let dir = tempfile::tempdir().expect("temp dir");
        let data = dir.path().join("data");
        let out = agent(&data, &args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(
            !data.exists(),
            "{args:?}: nothing is written before the checks"
        );
    }
}

#[test]
fn the_host_path_variable_takes_a_comma_separated_list() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let out = run(base(&data).env("BRAMBLE_ALLOW_HOST_PATH", "/srv/pool,/proc"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(
        err.contains("--allow-host-path \"/proc\": a system path"),
        "the second entry is checked too: {err}"
    );
}

#[test]
fn a_bad_join_token_or_a_plain_http_controller_is_refused_before_anything_is_done() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let out = run(base(&data)
        .args(["--controller", "https://127.0.0.1:9"])
        .env("BRAMBLE_JOIN_TOKEN", "an-old-style-token-0123456789"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains("does not start with BRAMBLE1-"), "{err}");
    assert!(
        !err.contains("an-old-style-token"),
        "the token is not echoed: {err}"
    );
    assert!(!data.exists(), "nothing is written before the checks");
    // A plain-HTTP controller URL.
    let out = run(base(&data).args(["--controller", "http://127.0.0.1:9"]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains("plain HTTP is refused"), "{err}");
    assert!(!data.exists());
    // A token file that is not there.
    let out = run(base(&data)
        .args(["--controller", "https://127.0.0.1:9"])
        .args(["--join-token-file", "/nonexistent/join-token"])
        .env_remove("BRAMBLE_JOIN_TOKEN"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(
        err.contains("--join-token-file /nonexistent/join-token"),
        "{err}"
    );
    assert!(!data.exists());
}

/// The agent's output when it starts, logs its first line, and stops because its Docker
/// Engine is not there.
fn first_log(format: Option<&str>) -> Output {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cmd = base(dir.path());
    cmd.args(["--controller", "https://127.0.0.1:9"])
        .env("BRAMBLE_LOG", "info")
        .env("DOCKER_HOST", "unix:///nonexistent/docker.sock")
        .env_remove("NO_COLOR");
    match format {
        Some(f) => cmd.env("BRAMBLE_LOG_FORMAT", f),
        None => cmd.env_remove("BRAMBLE_LOG_FORMAT"),
    };
    run(&mut cmd)
}

#[test]
fn logs_written_to_a_pipe_hold_no_colour_and_json_is_one_object_a_line() {
    let out = first_log(None);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("host path rules"), "{text}");
    assert!(
        !text.contains('\u{1b}'),
        "escape codes in a piped log: {text:?}"
    );

    let out = first_log(Some("json"));
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let rules = lines
        .iter()
        .find(|v| v["fields"]["message"] == "host path rules")
        .unwrap_or_else(|| panic!("no host path rules line in {text}"));
    assert_eq!(rules["level"], "INFO");
    assert!(rules["fields"]["host_paths"].is_string(), "{rules}");

    let out = first_log(Some("xml"));
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("BRAMBLE_LOG_FORMAT=\"xml\": expected text or json"),
        "{err}"
    );
}
