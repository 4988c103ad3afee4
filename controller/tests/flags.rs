//! The controller's flags for several controllers on etcd: a configuration that cannot
//! be safe or cannot work is refused before anything is made, with exit 64 and the flag
//! named.

use std::process::Command;

fn run(args: &[&str]) -> (i32, String, bool) {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let out = Command::new(env!("CARGO_BIN_EXE_bramble-controller"))
        .arg("--data-dir")
        .arg(&data)
        .args(["--no-local-agent", "--no-mdns", "--listen", "127.0.0.1:0"])
        .args(args)
        .output()
        .expect("run bramble-controller");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        data.exists(),
    )
}

#[test]
fn unsafe_or_unusable_etcd_settings_are_refused_before_anything_is_made() {
    let cases: [(&[&str], &str); 12] = [
        (&["--etcd-cluster", "pi1"], "is not NAME=HOST"),
        (
            &["--etcd-cluster", "a=10.0.0.1:2379"],
            "without scheme or port",
        ),
        (
            &[
                "--etcd-cluster",
                "a=10.0.0.1,b=10.0.0.2",
                "--etcd-name",
                "c",
            ],
            "--etcd-name \"c\" is not one of --etcd-cluster's members (a, b)",
        ),
        (
            &[
                "--etcd-cluster",
                "a=10.0.0.1",
                "--etcd",
                "http://127.0.0.1:2379",
            ],
            "cannot be used with",
        ),
        (&["--etcd-name", "a"], "--etcd-cluster"),
        (&["--etcd", "http://10.0.0.3:2379"], "in clear"),
        (&["--etcd", "https://etcd-1:2379"], "--etcd-cacert"),
        (
            &["--etcd", "http://127.0.0.1:2379,ftp://x:1"],
            "--etcd ftp://x:1",
        ),
        (
            &["--etcd", "http://127.0.0.1:2379", "--etcd-prefix", "/"],
            "--etcd-prefix",
        ),
        (
            &["--etcd", "http://127.0.0.1:2379", "--leader-lease", "1s"],
            "--leader-lease",
        ),
        (
            &["--etcd-cert", "/c.pem", "--etcd", "https://e:2379"],
            "--etcd-key",
        ),
        (&["--peer", "http://c2:7878"], "--peer http://c2:7878"),
    ];
    for (args, want) in cases {
        let (code, stderr, made) = run(args);
        assert_eq!(code, 64, "{args:?}: {stderr}");
        assert!(stderr.contains(want), "{args:?}: {stderr}");
        assert!(!made, "{args:?} made the data dir");
    }
    // A local member needs the etcd binary: said at once, naming the package.
    let (code, stderr, _) = run(&[
        "--etcd-cluster",
        "a=127.0.0.1",
        "--etcd-name",
        "a",
        "--etcd-binary",
        "/nonexistent/etcd",
    ]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("\"/nonexistent/etcd\" not found: install Debian's etcd-server"),
        "{stderr}"
    );
    // Plain http to another machine is the operator's explicit choice: accepted, and
    // the controller goes on to fail at the store it cannot reach, saying so.
    let (code, stderr, _) = run(&[
        "--etcd",
        "http://10.255.255.1:2379",
        "--etcd-allow-plain-http",
    ]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("cannot open store etcd http://10.255.255.1:2379"),
        "{stderr}"
    );
}

/// The controller's initial environment, once `ready` holds for it; killed afterwards.
fn environ_of_a_running_controller(tunables: Option<&str>) -> String {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_bramble-controller"));
    cmd.arg("--data-dir")
        .arg(&data)
        .args(["--no-local-agent", "--no-mdns", "--listen", "127.0.0.1:0"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    match tunables {
        Some(t) => cmd.env("GLIBC_TUNABLES", t),
        None => cmd.env_remove("GLIBC_TUNABLES"),
    };
    let mut child = cmd.spawn().expect("start bramble-controller");
    // Its data directory is made after the restart (if any): from then on the
    // environment is the one it runs with.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !data.join("ca.crt").exists() {
        assert!(
            child.try_wait().expect("wait").is_none(),
            "the controller exited"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "no ca.crt within 20 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let environ = std::fs::read(format!("/proc/{}/environ", child.id())).expect("environ");
    let _ = child.kill();
    let _ = child.wait();
    String::from_utf8_lossy(&environ).replace('\0', "\n")
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[test]
fn the_controller_runs_with_its_malloc_tunables_unless_the_operator_set_some() {
    // Read from the process's own memory, where glibc 2.36 cuts the value at its first
    // `:` as it parses it; so only the first tunable is looked for.
    let env = environ_of_a_running_controller(None);
    assert!(
        env.lines()
            .any(|l| l.starts_with("GLIBC_TUNABLES=glibc.malloc.mmap_threshold=65536")),
        "no GLIBC_TUNABLES in the controller's environment"
    );
    let env = environ_of_a_running_controller(Some("glibc.malloc.arena_max=2"));
    let set: Vec<&str> = env
        .lines()
        .filter(|l| l.starts_with("GLIBC_TUNABLES="))
        .collect();
    assert_eq!(set, ["GLIBC_TUNABLES=glibc.malloc.arena_max=2"]);
}
