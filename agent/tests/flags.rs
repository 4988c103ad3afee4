//! `bramble-agent` refuses a bad configuration at start, with exit code 64 and a message
//! that names the flag, before it touches Docker, the network or its data directory.

use std::process::{Command, Output};

fn agent(data_dir: &std::path::Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_bramble-agent"))
        .args(["--join-token", "token", "--node-name", "pi-1"])
        .arg("--data-dir")
        .arg(data_dir)
        // Nothing is listening there: an agent that got past its checks would keep
        // redialling, and the test would time out instead of passing by accident.
        .args(["--controller", "http://127.0.0.1:9"])
        .args(args)
        .env_remove("BRAMBLE_ALLOW_HOST_PATH")
        .env("BRAMBLE_LOG", "off")
        .output()
        .expect("run bramble-agent")
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
    let out = Command::new(env!("CARGO_BIN_EXE_bramble-agent"))
        .args(["--join-token", "token", "--node-name", "pi-1"])
        .arg("--data-dir")
        .arg(&data)
        .env("BRAMBLE_ALLOW_HOST_PATH", "/srv/pool,/proc")
        .env("BRAMBLE_LOG", "off")
        .output()
        .expect("run bramble-agent");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(
        err.contains("--allow-host-path \"/proc\": a system path"),
        "the second entry is checked too: {err}"
    );
}
