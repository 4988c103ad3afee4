//! The Docker runtime and the supervisor against the real Docker engine, with the
//! `testimg` image. Each test uses its own node name, so tests running in parallel never
//! see each other's containers, and a guard removes the node's containers at the end,
//! also when the test fails.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use bramble_agent::host_paths::Policy;
use bramble_agent::runtime::{
    error_chain, ContainerState, Error, EventAction, Runtime, RuntimeEvent,
};
use bramble_agent::supervisor::{Desired, Supervisor, FENCED_MESSAGE};
use bramble_api::duration::Duration as ApiDuration;
use bramble_api::manifest::{
    Backoff, HttpProbe, Kind, Port, Probe, Protocol, Restart, RestartPolicy, TcpProbe, Volume,
};
use bramble_api::quantity::{Cpu, Memory};
use bramble_api::task::{container_name, labels, TaskPhase, TaskSpec};
use bramble_api::wire::{AgentMessage, Assignment, TaskStatus};
use bramble_tests::{docker_inspect, ensure_test_image, eventually, unique_name, ContainerGuard};
use futures_util::StreamExt;
use tokio::sync::{mpsc, oneshot, watch};

const WAIT: Duration = Duration::from_secs(30);

/// A fresh node: its name, a runtime bound to it, and the guard for its containers.
async fn node() -> (String, Runtime, ContainerGuard) {
    let name = unique_name("rt");
    let guard = ContainerGuard::node(&name);
    ensure_test_image().await.expect("test image");
    let rt = Runtime::connect(&name).await.expect("docker is running");
    (name, rt, guard)
}

fn spec(args: &[&str]) -> TaskSpec {
    TaskSpec {
        sync: None,
        image: bramble_tests::TEST_IMAGE.to_string(),
        command: None,
        args: Some(args.iter().map(|a| a.to_string()).collect()),
        env: BTreeMap::new(),
        ports: vec![],
        volumes: vec![],
        resources: Default::default(),
        restart: Restart::default_for(Kind::Service),
        probes: Default::default(),
        timeout: None,
    }
}

fn assignment(task: &str, kind: Kind, spec: TaskSpec) -> Assignment {
    Assignment {
        restore_from: None,
        not_before: None,
        sync_to: Vec::new(),
        task: task.to_string(),
        kind,
        workload: task.rsplit_once('-').map_or(task, |(w, _)| w).to_string(),
        spec_hash: spec.hash(),
        spec,
        deadline: None,
        secrets: Default::default(),
        epoch: None,
    }
}

/// A free host port (released again at once; the small race is fine in tests).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// `GET path` on localhost:port; the body of a 200 answer.
fn http_get(port: u16, path: &str) -> anyhow::Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("no HTTP answer: {text:?}"))?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!("answer {head:?}");
    }
    Ok(body.to_string())
}

/// The node's Docker events, from a subscription that is known to be live: the event
/// stream only connects when first polled, so a marker container is started until its
/// start event arrives. Events of the marker may still follow; filter by task.
async fn subscribe(rt: &Runtime) -> mpsc::UnboundedReceiver<RuntimeEvent> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let stream = rt.events();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(Ok(e)) = stream.next().await {
            if tx.send(e).is_err() {
                break;
            }
        }
    });
    let marker = assignment("marker-aaaaaa-0", Kind::Job, spec(&["exit", "0"]));
    let id = rt.create_and_start(&marker).await.expect("marker");
    let deadline = Instant::now() + WAIT;
    'subscribed: loop {
        assert!(
            Instant::now() < deadline,
            "the event subscription never delivered"
        );
        let until = tokio::time::Instant::now() + Duration::from_millis(200);
        while let Ok(Some(e)) = tokio::time::timeout_at(until, rx.recv()).await {
            if e.task.as_deref() == Some(marker.task.as_str()) && e.action == EventAction::Start {
                break 'subscribed;
            }
        }
        // Not seen yet: the marker exits at once, so start it again.
        rt.start(&id).await.expect("marker started");
    }
    rt.remove(&id).await.expect("marker removed");
    rx
}

/// `rt` allowing host paths under `dir` only.
fn allowing(rt: Runtime, dir: &Path) -> Runtime {
    rt.with_host_paths(Policy::new(vec![dir.to_path_buf()]).expect("a valid prefix"))
}

#[tokio::test]
async fn creates_a_container_with_labels_env_limits_ports_and_mounts() {
    let (node, rt, _guard) = node().await;
    let port = free_port();
    let dir = tempfile::tempdir().expect("temp dir");
    let rt = allowing(rt, dir.path());
    let host_dir = dir.path().join("missing/yet");
    let mut s = spec(&["serve", "8080"]);
    s.env.insert("GREETING".into(), "hej".into());
    s.ports.push(Port {
        container: 8080,
        host: Some(port),
        protocol: Protocol::Tcp,
    });
    s.volumes.push(Volume {
        name: None,
        host_path: host_dir.display().to_string(),
        path: "/data".into(),
        read_only: true,
    });
    s.resources.cpu = Some(Cpu(500));
    s.resources.memory = Some(Memory::mib(64));
    let a = assignment("web-aaaaaa-0", Kind::Service, s);

    let id = rt.create_and_start(&a).await.expect("created");

    assert!(host_dir.is_dir(), "the volume's host directory is created");
    let body = eventually(WAIT, "the container to answer on its host port", || async {
        Ok(Some(http_get(port, "/env/GREETING")?))
    })
    .await
    .expect("serves");
    assert_eq!(body, "hej");

    let j = docker_inspect(&id).expect("inspect");
    assert_eq!(j["Name"], format!("/{}", container_name(&node, &a.task)));
    let l = &j["Config"]["Labels"];
    assert_eq!(l[labels::TASK], a.task.as_str());
    assert_eq!(l[labels::WORKLOAD], "web-aaaaaa");
    assert_eq!(l[labels::KIND], "Service");
    assert_eq!(l[labels::NODE], node.as_str());
    assert_eq!(l[labels::SPEC_HASH], a.spec_hash.as_str());
    assert_eq!(j["Config"]["Entrypoint"], serde_json::json!(["/testimg"]));
    assert_eq!(j["Config"]["Cmd"], serde_json::json!(["serve", "8080"]));
    let env = j["Config"]["Env"].to_string();
    assert!(env.contains("GREETING=hej"), "{env}");
    let h = &j["HostConfig"];
    assert_eq!(h["NanoCpus"], 500_000_000);
    assert_eq!(h["Memory"], 64 << 20);
    assert_eq!(h["MemorySwap"], 64 << 20);
    assert_eq!(h["RestartPolicy"]["Name"], "no");
    assert_eq!(h["LogConfig"]["Type"], "json-file");
    assert_eq!(h["LogConfig"]["Config"]["max-size"], "10m");
    assert_eq!(h["LogConfig"]["Config"]["max-file"], "3");
    assert_eq!(
        h["PortBindings"]["8080/tcp"][0]["HostPort"],
        port.to_string()
    );
    assert_eq!(
        h["Binds"],
        serde_json::Value::Null,
        "no `src:dst:opts` text"
    );
    let m = &h["Mounts"][0];
    assert_eq!(m["Type"], "bind");
    assert_eq!(m["Source"], host_dir.display().to_string());
    assert_eq!(m["Target"], "/data");
    assert_eq!(m["ReadOnly"], true);
    assert_eq!(h["SecurityOpt"], serde_json::json!(["no-new-privileges"]));

    let listed = rt.list().await.expect("list");
    assert_eq!(listed.len(), 1);
    let o = &listed[0];
    assert_eq!(
        o.host_ports,
        [format!("{port}/tcp")],
        "the host ports it binds, for the round's lanes"
    );
    assert_eq!(
        (o.id.as_str(), o.task.as_str()),
        (id.as_str(), a.task.as_str())
    );
    assert_eq!(o.kind, Some(Kind::Service));
    assert_eq!(o.spec_hash, a.spec_hash);
    assert_eq!(o.state, ContainerState::Running);
    assert!(o.started_at.is_some() && o.finished_at.is_none(), "{o:?}");
    assert_eq!(o.exit_code, None);
}

/// The CFS quota the kernel enforces on container `id`, in microseconds per 100 ms
/// period: its cgroup's `cpu.cfs_quota_us` (cgroup v1) or `cpu.max` (v2), wherever the
/// engine's cgroup driver put it; None for no quota.
fn kernel_cpu_quota(id: &str) -> anyhow::Result<Option<i64>> {
    fn find(dir: &Path, id: &str, depth: usize, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let path = e.path();
            if !e.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            if e.file_name().to_string_lossy().contains(id) {
                out.push(path);
            } else if depth > 0 {
                find(&path, id, depth - 1, out);
            }
        }
    }
    let mut dirs = Vec::new();
    find(Path::new("/sys/fs/cgroup"), id, 4, &mut dirs);
    for dir in &dirs {
        if let Ok(v1) = std::fs::read_to_string(dir.join("cpu.cfs_quota_us")) {
            let period: i64 = std::fs::read_to_string(dir.join("cpu.cfs_period_us"))?
                .trim()
                .parse()?;
            let quota: i64 = v1.trim().parse()?;
            return Ok((quota > 0).then(|| quota * 100_000 / period));
        }
        if let Ok(v2) = std::fs::read_to_string(dir.join("cpu.max")) {
            let (quota, period) = v2
                .trim()
                .split_once(' ')
                .ok_or_else(|| anyhow!("cpu.max: {v2}"))?;
            if quota == "max" {
                return Ok(None);
            }
            return Ok(Some(
                quota.parse::<i64>()? * 100_000 / period.parse::<i64>()?,
            ));
        }
    }
    bail!("no cgroup with a CPU quota file for container {id} under /sys/fs/cgroup: {dirs:?}")
}

#[tokio::test]
async fn a_cpu_limit_set_after_the_start_is_held_by_docker_and_the_kernel() {
    let (_node, rt, _guard) = node().await;
    let mut s = spec(&["serve", "8080"]);
    s.resources.cpu = Some(Cpu(100));
    s.resources.memory = Some(Memory::mib(8));
    let a = assignment("cpu-aaaaaa-0", Kind::Service, s);

    let id = rt.create_and_start(&a).await.expect("started");

    let j = docker_inspect(&id).expect("inspect");
    assert_eq!(j["State"]["Running"], true);
    assert_eq!(j["HostConfig"]["NanoCpus"], 100_000_000);
    assert_eq!(kernel_cpu_quota(&id).expect("cgroup"), Some(10_000));
    let listed = rt.list().await.expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].nano_cpus, Some(100_000_000));

    // As the supervisor sets it on a container that lacks it: running, nothing else touched.
    rt.limit_cpu(&id, 250_000_000).await.expect("limited");
    let j = docker_inspect(&id).expect("inspect");
    assert_eq!(j["State"]["Running"], true);
    assert_eq!(j["HostConfig"]["NanoCpus"], 250_000_000);
    assert_eq!(j["HostConfig"]["Memory"], 8 << 20, "the memory limit stays");
    assert_eq!(kernel_cpu_quota(&id).expect("cgroup"), Some(25_000));

    // A restart's way: widened to the whole node while stopped, started, put back.
    rt.stop(&id, Duration::from_secs(5)).await.expect("stopped");
    let wide = bramble_agent::runtime::whole_node_nano_cpus();
    rt.limit_cpu(&id, wide)
        .await
        .expect("Docker takes every core of its host");
    rt.start(&id).await.expect("started again");
    rt.limit_cpu(&id, 250_000_000).await.expect("put back");
    let j = docker_inspect(&id).expect("inspect");
    assert_eq!(j["State"]["Running"], true);
    assert_eq!(j["HostConfig"]["NanoCpus"], 250_000_000);
    assert_eq!(kernel_cpu_quota(&id).expect("cgroup"), Some(25_000));

    rt.remove(&id).await.expect("removed");
    let err = rt.limit_cpu(&id, 250_000_000).await.expect_err("gone");
    assert!(
        matches!(err, Error::NotFound { .. }),
        "{}",
        error_chain(&err)
    );
}

#[tokio::test]
async fn every_container_runs_with_no_new_privileges() {
    let (_, rt, _guard) = node().await;
    let a = assignment("nnp-aaaaaa-0", Kind::Service, spec(&["sleep", "60"]));
    let id = rt.create_and_start(&a).await.expect("created");
    let j = docker_inspect(&id).expect("inspect");
    assert_eq!(
        j["HostConfig"]["SecurityOpt"],
        serde_json::json!(["no-new-privileges"])
    );
    // And the kernel agrees: the container's process can never gain privileges (a
    // setuid binary in its image runs with the caller's).
    let pid = j["State"]["Pid"]
        .as_u64()
        .expect("a running container has a pid");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    assert!(status.lines().any(|l| l == "NoNewPrivs:\t1"), "{status}");
}

/// The ids of every container (of any node) labelled with `task`.
fn containers_labelled(task: &str) -> Vec<String> {
    let out = Command::new("docker")
        .args(["ps", "-a", "-q", "--filter"])
        .arg(format!("label={}={task}", labels::TASK))
        .output()
        .expect("docker ps");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

#[tokio::test]
async fn the_agent_refuses_host_paths_outside_its_rules_and_makes_nothing() {
    let (node, rt, _guard) = node().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let root = std::fs::canonicalize(dir.path()).expect("resolves");
    let allowed = root.join("volumes");
    let outside = root.join("outside");
    std::fs::create_dir_all(&allowed).expect("mkdir");
    std::fs::create_dir_all(&outside).expect("mkdir");
    // Planted by a container that mounts part of the allowed directory: a way out.
    std::os::unix::fs::symlink(&outside, allowed.join("escape")).expect("symlink");
    let rt = allowing(rt, &allowed);
    let shown = allowed.display().to_string();

    // (task, hostPath, the refusal, a directory that must not appear)
    let run_dir = PathBuf::from(format!("/var/run/{node}"));
    let cases: Vec<(&str, String, String, Option<PathBuf>)> = vec![
        ("root-aaaaaa-0", "/".into(), "a system path".into(), None),
        (
            "run-aaaaaa-0",
            "/var/run".into(),
            "a system path".into(),
            None,
        ),
        (
            "rundir-aaaaaa-0",
            run_dir.display().to_string(),
            "under the system path /var/run".into(),
            Some(run_dir.clone()),
        ),
        (
            "colon-aaaaaa-0",
            format!("{shown}/x:/etc"),
            "contains ':', which Docker's bind syntax would read as a separator".into(),
            Some(allowed.join("x:")),
        ),
        (
            "link-aaaaaa-0",
            format!("{shown}/escape/made"),
            format!(
                "it resolves through a symbolic link to {}, which is not under an allowed prefix",
                outside.join("made").display()
            ),
            Some(outside.join("made")),
        ),
        (
            "out-aaaaaa-0",
            outside.join("direct").display().to_string(),
            "not under an allowed prefix".into(),
            Some(outside.join("direct")),
        ),
    ];
    let volume = |host_path: &str| Volume {
        name: None,
        host_path: host_path.to_string(),
        path: "/data".into(),
        read_only: false,
    };
    let mut tasks: Vec<Assignment> = cases
        .iter()
        .map(|(task, host_path, _, _)| {
            let mut s = spec(&["sleep", "600"]);
            s.volumes.push(volume(host_path));
            assignment(task, Kind::Service, s)
        })
        .collect();
    // An allowed one beside them: the supervisor is at work, so what is absent for the
    // others is refused, not merely late.
    let mut good = spec(&["sleep", "600"]);
    good.volumes.push(volume(&format!("{shown}/good")));
    tasks.push(assignment("good-aaaaaa-0", Kind::Service, good));

    let sup = Sup::spawn(&rt, &node);
    sup.assign(&tasks);
    sup.reaches("good-aaaaaa-0", TaskPhase::Running).await;
    assert!(allowed.join("good").is_dir());
    for (task, host_path, rule, _) in &cases {
        let s = sup.reaches(task, TaskPhase::Failed).await;
        let want = format!("hostPath {host_path:?} is refused: {rule}; allowed: {shown}");
        assert_eq!(s.message.as_deref(), Some(want.as_str()), "{task}");
        assert!(
            s.gave_up,
            "{task}: given up, so the controller places it elsewhere"
        );
        assert_eq!(s.container_id, None, "{task}");
    }
    sup.shutdown().await;

    // Straight to the runtime, as a supervisor bug would: refused all the same.
    for a in &tasks[..cases.len()] {
        let err = rt.create_and_start(a).await.expect_err("refused");
        assert!(matches!(err, Error::HostPath { .. }), "{}: {err:?}", a.task);
    }
    for (task, host_path, _, made) in &cases {
        assert_eq!(containers_labelled(task), Vec::<String>::new(), "{task}");
        if let Some(dir) = made {
            assert!(
                std::fs::symlink_metadata(dir).is_err(),
                "{task}: {} was made for {host_path}",
                dir.display()
            );
        }
    }
    assert_eq!(
        std::fs::read_dir(&outside).expect("outside").count(),
        0,
        "nothing appeared outside the allowed prefix"
    );
    let listed: Vec<String> = rt
        .list()
        .await
        .expect("list")
        .into_iter()
        .map(|o| o.task)
        .collect();
    assert_eq!(listed, ["good-aaaaaa-0"]);
}

#[tokio::test]
async fn lists_only_the_nodes_own_containers() {
    let (_, rt_a, _guard_a) = node().await;
    let (_, rt_b, _guard_b) = node().await;
    let a = assignment("a-aaaaaa-0", Kind::Service, spec(&["sleep", "60"]));
    let b = assignment("b-bbbbbb-0", Kind::Service, spec(&["sleep", "60"]));
    let id_a = rt_a.create_and_start(&a).await.expect("a");
    let id_b = rt_b.create_and_start(&b).await.expect("b");
    let ids =
        |v: Vec<bramble_agent::runtime::Observed>| v.into_iter().map(|o| o.id).collect::<Vec<_>>();
    assert_eq!(ids(rt_a.list().await.expect("list a")), vec![id_a]);
    assert_eq!(ids(rt_b.list().await.expect("list b")), vec![id_b]);
}

#[tokio::test]
async fn stop_ends_the_container_gracefully_and_remove_deletes_it() {
    let (_, rt, _guard) = node().await;
    let a = assignment("s-aaaaaa-0", Kind::Service, spec(&["sleep", "600"]));
    let id = rt.create_and_start(&a).await.expect("created");

    let started = Instant::now();
    rt.stop(&id, Duration::from_secs(20))
        .await
        .expect("stopped");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "testimg exits on SIGTERM instead of waiting for the SIGKILL"
    );
    let o = rt.inspect(&id).await.expect("inspect");
    assert_eq!(o.state, ContainerState::Exited);
    assert_eq!(o.exit_code, Some(0));
    assert!(o.finished_at.is_some());
    // Stopping a stopped container is fine.
    rt.stop(&id, Duration::from_secs(1))
        .await
        .expect("stopped again");

    rt.remove(&id).await.expect("removed");
    assert!(matches!(rt.inspect(&id).await, Err(Error::NotFound { .. })));
    rt.remove(&id)
        .await
        .expect("removing a removed container is fine");
    assert!(matches!(
        rt.stop(&id, Duration::from_secs(1)).await,
        Err(Error::NotFound { .. })
    ));
}

#[tokio::test]
async fn replaces_a_leftover_container_with_the_tasks_name() {
    let (_, rt, _guard) = node().await;
    let a = assignment("l-aaaaaa-0", Kind::Service, spec(&["sleep", "600"]));
    let first = rt.create_and_start(&a).await.expect("first");
    let second = rt.create_and_start(&a).await.expect("second");
    assert_ne!(first, second);
    let listed = rt.list().await.expect("list");
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].id, second);
}

#[tokio::test]
async fn streams_logs_of_stdout_and_stderr_with_tail_and_follow() {
    let (_, rt, _guard) = node().await;
    let printer = assignment("p-aaaaaa-0", Kind::Job, spec(&["print", "line", "10", "5"]));
    let id = rt.create_and_start(&printer).await.expect("created");
    eventually(WAIT, "the printer to finish", || async {
        let o = rt.inspect(&id).await?;
        Ok((o.state == ContainerState::Exited).then_some(()))
    })
    .await
    .expect("exits");
    let all: Vec<String> = rt
        .logs(&id, false, None)
        .await
        .expect("logs")
        .map(|l| l.expect("log chunk"))
        .collect()
        .await;
    assert_eq!(all.concat(), "line 1\nline 2\nline 3\nline 4\nline 5\n");
    let tail: Vec<String> = rt
        .logs(&id, false, Some(2))
        .await
        .expect("logs")
        .map(|l| l.expect("log chunk"))
        .collect()
        .await;
    assert_eq!(tail.concat(), "line 4\nline 5\n");

    let failing = assignment("f-aaaaaa-0", Kind::Job, spec(&["exit", "3"]));
    let id = rt.create_and_start(&failing).await.expect("created");
    let stderr = eventually(WAIT, "stderr in the logs", || async {
        let text: Vec<String> = rt
            .logs(&id, false, None)
            .await?
            .map(|l| l.unwrap_or_default())
            .collect()
            .await;
        let text = text.concat();
        Ok(text.contains("exiting with code 3").then_some(text))
    })
    .await
    .expect("stderr");
    assert!(stderr.contains("testimg: exiting with code 3"), "{stderr}");

    let ticker = assignment("t-aaaaaa-0", Kind::Service, spec(&["print", "tick", "100"]));
    let id = rt.create_and_start(&ticker).await.expect("created");
    let mut follow = Box::pin(rt.logs(&id, true, Some(0)).await.expect("follow"));
    let mut seen = String::new();
    // Lines printed after the follow began, whichever they are: on a loaded machine the
    // container may print several before the request is attached.
    tokio::time::timeout(WAIT, async {
        while seen.matches("tick ").count() < 2 {
            match follow.next().await {
                Some(chunk) => seen.push_str(&chunk.expect("chunk")),
                None => panic!("follow ended early: {seen:?}"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("follow saw only {seen:?}"));
    assert!(matches!(
        rt.logs("no-such-container-xyz", false, None).await,
        Err(Error::NotFound { .. })
    ));
}

#[tokio::test]
async fn an_absent_image_gives_a_clear_error_and_leaves_nothing() {
    let (_, rt, _guard) = node().await;
    let image = "bramble-missing/nothing:1";
    let err = rt.ensure_image(image).await.expect_err("cannot pull");
    assert!(matches!(err, Error::ImagePull { .. }), "{err:?}");
    let text = error_chain(&err);
    assert!(
        text.starts_with("image bramble-missing/nothing:1 not found locally and pull failed: "),
        "{text}"
    );

    let mut s = spec(&["sleep", "1"]);
    s.image = image.to_string();
    let a = assignment("m-aaaaaa-0", Kind::Service, s);
    let err = rt.create_and_start(&a).await.expect_err("cannot create");
    assert!(error_chain(&err).contains("not found locally and pull failed"));
    assert!(rt.list().await.expect("list").is_empty());
    // The local test image is used as is, never pulled.
    rt.ensure_image(bramble_tests::TEST_IMAGE)
        .await
        .expect("local image");
}

#[tokio::test]
async fn the_oom_killer_is_reported() {
    let (_, rt, _guard) = node().await;
    // The allocation waits half a second: containerd starts watching a container's
    // memory cgroup for OOM only after `runc start` returns, so on cgroup v1 an OOM in
    // the first milliseconds (seen in CI under load: killed 16 ms after start) gives
    // exit code 137 with no OOM flag and no `oom` event. Docker cannot report it; the
    // agent's message for that case is tested in the planner.
    let mut s = spec(&["eat", "256", "0.5"]);
    s.resources.memory = Some(Memory::mib(32));
    let a = assignment("o-aaaaaa-0", Kind::Service, s);
    let id = rt.create_and_start(&a).await.expect("created");
    let o = eventually(WAIT, "the container to be OOM-killed", || async {
        let o = rt.inspect(&id).await?;
        if o.state != ContainerState::Exited {
            bail!("state {:?}", o.state);
        }
        Ok(Some(o))
    })
    .await
    .expect("killed");
    assert!(o.oom_killed, "{o:?}");
    assert_eq!(o.exit_code, Some(137));
}

#[tokio::test]
async fn events_tell_start_and_death_with_the_exit_code() {
    let (_, rt, _guard) = node().await;
    let mut events = subscribe(&rt).await;
    let a = assignment("e-aaaaaa-0", Kind::Job, spec(&["exit", "2", "0.2"]));
    let id = rt.create_and_start(&a).await.expect("created");
    let mut seen = Vec::new();
    tokio::time::timeout(WAIT, async {
        while let Some(e) = events.recv().await {
            if e.task.as_deref() != Some(a.task.as_str()) {
                continue;
            }
            assert_eq!(e.id, id);
            let done = e.action == EventAction::Die;
            seen.push(e);
            if done {
                break;
            }
        }
    })
    .await
    .expect("events arrive");
    assert_eq!(seen.first().map(|e| e.action), Some(EventAction::Start));
    let die = seen.last().expect("a die event");
    assert_eq!((die.action, die.exit_code), (EventAction::Die, Some(2)));
}

/// A supervisor running in the background, with its reports collected.
struct Sup {
    desired: watch::Sender<Desired>,
    msgs: Arc<Mutex<Vec<AgentMessage>>>,
    stop: Option<oneshot::Sender<()>>,
    handle: tokio::task::JoinHandle<()>,
    observer: bramble_agent::supervisor::Observer,
}

impl Sup {
    fn spawn(rt: &Runtime, node: &str) -> Sup {
        let (tx, mut rx) = mpsc::channel(1024);
        let sup = Supervisor::new(rt.clone(), node.to_string(), tx);
        let observer = sup.observer();
        let (desired, desired_rx) = watch::channel(Desired::default());
        let (stop, stop_rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(sup.run(desired_rx, async {
            let _ = stop_rx.await;
        }));
        let msgs = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&msgs);
        tokio::spawn(async move {
            while let Some(m) = rx.recv().await {
                sink.lock().expect("lock").push(m);
            }
        });
        Sup {
            desired,
            msgs,
            stop: Some(stop),
            handle,
            observer,
        }
    }

    /// The link lost the controller.
    fn fence(&self) {
        self.desired.send_modify(|d| d.fenced = true);
    }

    /// A fresh task set after reconnecting: it lifts the fence.
    fn assign_unfenced(&self, tasks: &[Assignment]) {
        self.desired.send_modify(|d| {
            d.tasks = Some(tasks.to_vec());
            d.fenced = false;
        });
    }

    fn assign(&self, tasks: &[Assignment]) {
        self.desired.send_modify(|d| d.tasks = Some(tasks.to_vec()));
    }

    fn statuses(&self, task: &str) -> Vec<TaskStatus> {
        self.msgs
            .lock()
            .expect("lock")
            .iter()
            .filter_map(|m| match m {
                AgentMessage::Status { status } if status.task == task => Some(status.clone()),
                _ => None,
            })
            .collect()
    }

    fn last_status(&self, task: &str) -> anyhow::Result<TaskStatus> {
        self.statuses(task)
            .pop()
            .ok_or_else(|| anyhow!("no status for {task} yet"))
    }

    fn removed(&self, task: &str) -> bool {
        self.msgs
            .lock()
            .expect("lock")
            .iter()
            .any(|m| matches!(m, AgentMessage::Removed { task: t } if t == task))
    }

    /// Waits until the last report of `task` is in `phase`, and returns it.
    async fn reaches(&self, task: &str, phase: TaskPhase) -> TaskStatus {
        eventually(WAIT, &format!("{task} to be reported {phase}"), || async {
            let s = self.last_status(task)?;
            if s.phase != phase {
                bail!("last report {s:?}");
            }
            Ok(Some(s))
        })
        .await
        .expect("reported")
    }

    async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(WAIT, &mut self.handle)
            .await
            .expect("the supervisor stops promptly")
            .expect("the supervisor does not panic");
    }
}

#[tokio::test]
async fn supervisor_runs_the_desired_tasks_with_their_labels() {
    let (node, rt, _guard) = node().await;
    let sup = Sup::spawn(&rt, &node);
    let a = assignment("web-aaaaaa-0", Kind::Wallet, spec(&["serve", "8080"]));
    sup.assign(std::slice::from_ref(&a));

    let s = sup.reaches(&a.task, TaskPhase::Running).await;
    let listed = rt.list().await.expect("list");
    assert_eq!(listed.len(), 1);
    let o = &listed[0];
    assert_eq!(s.container_id.as_deref(), Some(o.id.as_str()));
    assert_eq!(s.started_at, o.started_at);
    assert_eq!(o.state, ContainerState::Running);
    assert_eq!(
        (o.task.as_str(), o.node.as_str()),
        (a.task.as_str(), node.as_str())
    );
    assert_eq!(
        (o.kind, o.spec_hash.as_str()),
        (Some(Kind::Wallet), a.spec_hash.as_str())
    );
    assert_eq!(o.workload, "web-aaaaaa");
    assert_eq!(sup.statuses(&a.task)[0].phase, TaskPhase::Starting);
    sup.shutdown().await;
}

#[tokio::test]
async fn supervisor_leaves_containers_alone_until_the_first_task_set() {
    let (node, rt, _guard) = node().await;
    let stray = assignment("x-aaaaaa-0", Kind::Service, spec(&["sleep", "600"]));
    let id = rt.create_and_start(&stray).await.expect("created");
    let sup = Sup::spawn(&rt, &node);
    // A negative check needs time to pass: give a wrongly eager supervisor a chance.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        rt.inspect(&id).await.expect("still there").state,
        ContainerState::Running
    );
    assert!(sup.msgs.lock().expect("lock").is_empty());
    let hello = sup.observer.observe().await.expect("observe");
    assert_eq!(hello.len(), 1);
    assert_eq!(
        (hello[0].task.as_str(), hello[0].phase),
        (stray.task.as_str(), TaskPhase::Running)
    );

    sup.assign(&[]);
    eventually(
        WAIT,
        "the unassigned container to be removed and reported",
        || async { Ok((sup.removed(&stray.task) && rt.list().await?.is_empty()).then_some(())) },
    )
    .await
    .expect("removed");
    sup.shutdown().await;
}

#[tokio::test]
async fn supervisor_replaces_a_container_whose_spec_changed() {
    let (node, rt, _guard) = node().await;
    let sup = Sup::spawn(&rt, &node);
    let a = assignment(
        "web-aaaaaa-0",
        Kind::Service,
        spec(&["serve", "8080", "v1"]),
    );
    sup.assign(std::slice::from_ref(&a));
    let first = sup.reaches(&a.task, TaskPhase::Running).await;

    let b = assignment(
        "web-aaaaaa-0",
        Kind::Service,
        spec(&["serve", "8080", "v2"]),
    );
    assert_ne!(a.spec_hash, b.spec_hash);
    sup.assign(std::slice::from_ref(&b));
    let o = eventually(WAIT, "the container to be replaced", || async {
        let listed = rt.list().await?;
        match listed.as_slice() {
            [o] if o.spec_hash == b.spec_hash && o.state == ContainerState::Running => {
                Ok(Some(o.clone()))
            }
            other => bail!("containers {other:?}"),
        }
    })
    .await
    .expect("replaced");
    assert_ne!(Some(o.id.clone()), first.container_id);
    assert_eq!(o.id.len(), 64);
    let j = docker_inspect(&o.id).expect("inspect");
    assert_eq!(
        j["Config"]["Cmd"],
        serde_json::json!(["serve", "8080", "v2"])
    );
    eventually(WAIT, "the new container to be reported running", || async {
        let s = sup.last_status(&a.task)?;
        if s.phase != TaskPhase::Running || s.container_id.as_deref() != Some(o.id.as_str()) {
            bail!("last report {s:?}");
        }
        Ok(Some(()))
    })
    .await
    .expect("reported");
    sup.shutdown().await;
}

#[tokio::test]
async fn supervisor_removes_an_unassigned_task_and_reports_it_removed() {
    let (node, rt, _guard) = node().await;
    let sup = Sup::spawn(&rt, &node);
    let keep = assignment("keep-aaaaaa-0", Kind::Service, spec(&["sleep", "600"]));
    let drop = assignment("drop-aaaaaa-0", Kind::Service, spec(&["sleep", "600"]));
    sup.assign(&[keep.clone(), drop.clone()]);
    sup.reaches(&keep.task, TaskPhase::Running).await;
    sup.reaches(&drop.task, TaskPhase::Running).await;

    sup.assign(std::slice::from_ref(&keep));
    eventually(WAIT, "the unassigned task to be removed", || async {
        let listed = rt.list().await?;
        let tasks: Vec<&str> = listed.iter().map(|o| o.task.as_str()).collect();
        if tasks != [keep.task.as_str()] {
            bail!("containers of {tasks:?}");
        }
        Ok(sup.removed(&drop.task).then_some(()))
    })
    .await
    .expect("removed");
    assert!(!sup.removed(&keep.task));
    sup.shutdown().await;
}

#[tokio::test]
async fn supervisor_restarts_a_crashing_container_with_growing_delays_then_gives_up() {
    let (node, rt, _guard) = node().await;
    let mut events = subscribe(&rt).await;
    let sup = Sup::spawn(&rt, &node);
    let mut s = spec(&["exit", "1"]);
    s.restart = Restart {
        policy: RestartPolicy::Always,
        backoff: Backoff {
            initial: ApiDuration::from_millis(300),
            max: ApiDuration::from_secs(5),
        },
        max_failures: 4,
        window: ApiDuration::from_secs(60),
    };
    let a = assignment("crash-aaaaaa-0", Kind::Service, s);
    sup.assign(std::slice::from_ref(&a));

    // Four runs: the first and three restarts, then the fourth failure gives up.
    let mut starts = Vec::new();
    tokio::time::timeout(WAIT, async {
        while starts.len() < 4 {
            let e = events.recv().await.expect("event stream");
            if e.task.as_deref() == Some(a.task.as_str()) && e.action == EventAction::Start {
                starts.push(Instant::now());
            }
        }
    })
    .await
    .expect("restarted three times");
    let failed = sup.reaches(&a.task, TaskPhase::Failed).await;
    assert_eq!(
        failed.message.as_deref(),
        Some("gave up after 4 failures in 1m: exited with code 1")
    );
    assert_eq!((failed.exit_code, failed.restarts), (Some(1), 3));
    assert!(failed.gave_up);
    assert!(failed.finished_at.is_some());

    let gaps: Vec<Duration> = starts.windows(2).map(|w| w[1] - w[0]).collect();
    for (gap, min) in gaps.iter().zip([300u64, 600, 1200]) {
        assert!(
            *gap >= Duration::from_millis(min - 50),
            "gap {gap:?} shorter than the back-off {min}ms: {gaps:?}"
        );
    }
    assert!(gaps[2] > gaps[0], "delays grow: {gaps:?}");
    // Given up: the exited container is kept (for its logs) and not started again.
    let listed = rt.list().await.expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].state, ContainerState::Exited);
    // While crashing, the task was reported Starting (awaiting restart), never Failed.
    let phases: Vec<TaskPhase> = sup.statuses(&a.task).iter().map(|s| s.phase).collect();
    assert_eq!(
        phases.iter().filter(|p| **p == TaskPhase::Failed).count(),
        1,
        "{phases:?}"
    );
    sup.shutdown().await;
}

#[tokio::test]
async fn supervisor_does_not_restart_a_job_that_succeeded() {
    let (node, rt, _guard) = node().await;
    let sup = Sup::spawn(&rt, &node);
    let a = assignment("job-aaaaaa-0", Kind::Job, spec(&["exit", "0"]));
    sup.assign(std::slice::from_ref(&a));
    let s = sup.reaches(&a.task, TaskPhase::Succeeded).await;
    assert_eq!((s.exit_code, s.restarts), (Some(0), 0));
    assert!(!s.gave_up);
    assert!(s.finished_at.is_some());
    let listed = rt.list().await.expect("list");
    assert_eq!(listed.len(), 1, "the finished container stays for its logs");
    assert_eq!(listed[0].state, ContainerState::Exited);
    sup.shutdown().await;
}

#[tokio::test]
async fn supervisor_reports_an_image_it_cannot_pull_and_gives_up() {
    let (node, rt, _guard) = node().await;
    let sup = Sup::spawn(&rt, &node);
    let mut s = spec(&["sleep", "1"]);
    s.image = "bramble-missing/nothing:1".into();
    s.restart.backoff.initial = ApiDuration::from_millis(100);
    s.restart.max_failures = 2;
    let a = assignment("pull-aaaaaa-0", Kind::Service, s);
    sup.assign(std::slice::from_ref(&a));

    let failed = sup.reaches(&a.task, TaskPhase::Failed).await;
    assert!(failed.gave_up);
    let msg = failed.message.unwrap_or_default();
    assert!(msg.starts_with("gave up after 2 failures in 10m: image bramble-missing/nothing:1 not found locally and pull failed: "), "{msg}");
    let retrying = sup
        .statuses(&a.task)
        .into_iter()
        .find(|s| s.message.as_deref().is_some_and(|m| m.contains("retrying")))
        .expect("a retrying report before giving up");
    assert_eq!(retrying.phase, TaskPhase::Starting);

    // Unassigned, it is confirmed gone although it never had a container.
    sup.assign(&[]);
    eventually(WAIT, "Removed for the containerless task", || async {
        Ok(sup.removed(&a.task).then_some(()))
    })
    .await
    .expect("removed");
    sup.shutdown().await;
}

#[tokio::test]
async fn restarted_supervisor_adopts_the_running_container() {
    let (node, rt, _guard) = node().await;
    let a = assignment("wallet-aaaaaa-0", Kind::Wallet, spec(&["serve", "8080"]));
    let first = Sup::spawn(&rt, &node);
    first.assign(std::slice::from_ref(&a));
    let running = first.reaches(&a.task, TaskPhase::Running).await;
    let id = running.container_id.clone().expect("container id");
    first.shutdown().await;
    assert_eq!(
        rt.inspect(&id).await.expect("kept").state,
        ContainerState::Running,
        "stopping the supervisor leaves containers running"
    );

    let second = Sup::spawn(&rt, &node);
    let hello = second.observer.observe().await.expect("observe");
    assert_eq!(hello.len(), 1);
    assert_eq!(hello[0].container_id.as_deref(), Some(id.as_str()));
    assert_eq!(hello[0].phase, TaskPhase::Running);
    second.assign(std::slice::from_ref(&a));
    let adopted = second.reaches(&a.task, TaskPhase::Running).await;
    assert_eq!(adopted.container_id.as_deref(), Some(id.as_str()));
    let listed = rt.list().await.expect("list");
    assert_eq!(listed.len(), 1, "no second container: {listed:?}");
    assert_eq!(listed[0].id, id);
    assert_eq!(
        second.statuses(&a.task).len(),
        1,
        "adoption reports Running once, without a Starting"
    );
    second.shutdown().await;
}

#[tokio::test]
async fn engine_version_is_reported() {
    let (_, rt, _guard) = node().await;
    let v = rt.version().await.expect("version");
    assert!(v.chars().next().is_some_and(|c| c.is_ascii_digit()), "{v}");
}

/// The node's containers of `task`.
async fn containers_of(
    rt: &Runtime,
    task: &str,
) -> anyhow::Result<Vec<bramble_agent::runtime::Observed>> {
    Ok(rt
        .list()
        .await?
        .into_iter()
        .filter(|o| o.task == task)
        .collect())
}

/// Polls every 20 ms (finer than `eventually`, to measure how fast the fence acts) until
/// the task has no container; returns how long that took.
async fn gone_within(rt: &Runtime, task: &str, limit: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let left = containers_of(rt, task).await.expect("list");
        if left.is_empty() {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "{task} still has containers after {limit:?}: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_fenced_supervisor_stops_its_wallet_and_runs_it_again_only_on_a_fresh_task_set() {
    let (node, rt, _guard) = node().await;
    let sup = Sup::spawn(&rt, &node);
    let wallet = assignment("ltc-aaaaaa-0", Kind::Wallet, spec(&["serve", "8080"]));
    let pool = assignment("pool-aaaaaa-0", Kind::Service, spec(&["sleep", "600"]));
    let both = [wallet.clone(), pool.clone()];
    sup.assign(&both);
    let first = sup.reaches(&wallet.task, TaskPhase::Running).await;
    let pool_running = sup.reaches(&pool.task, TaskPhase::Running).await;

    sup.fence();
    let took = gone_within(&rt, &wallet.task, Duration::from_secs(5)).await;
    assert!(
        took < Duration::from_millis(1500),
        "the fenced wallet took {took:?} to go"
    );
    let fenced = sup.reaches(&wallet.task, TaskPhase::Stopped).await;
    assert_eq!(fenced.message.as_deref(), Some(FENCED_MESSAGE));

    // The task set held from before the fence does not bring the wallet back, not even
    // when it is sent again while still fenced; the service is untouched throughout.
    sup.assign(&both);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(containers_of(&rt, &wallet.task)
        .await
        .expect("list")
        .is_empty());
    let pool_now = containers_of(&rt, &pool.task).await.expect("list");
    assert_eq!(pool_now.len(), 1);
    assert_eq!(Some(pool_now[0].id.clone()), pool_running.container_id);
    assert_eq!(pool_now[0].state, ContainerState::Running);
    assert!(!sup.removed(&wallet.task), "a fenced wallet stays assigned");

    // A fresh task set after reconnecting is the truth: the wallet runs again.
    sup.assign_unfenced(&both);
    let again = sup.reaches(&wallet.task, TaskPhase::Running).await;
    assert_ne!(again.container_id, first.container_id, "a new container");
    let listed = containers_of(&rt, &wallet.task).await.expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].state, ContainerState::Running);
    sup.shutdown().await;
}

#[tokio::test]
async fn a_fresh_task_set_without_the_wallet_leaves_it_stopped() {
    let (node, rt, _guard) = node().await;
    let sup = Sup::spawn(&rt, &node);
    let wallet = assignment("ltc-bbbbbb-0", Kind::Wallet, spec(&["sleep", "600"]));
    sup.assign(std::slice::from_ref(&wallet));
    sup.reaches(&wallet.task, TaskPhase::Running).await;
    sup.fence();
    gone_within(&rt, &wallet.task, Duration::from_secs(5)).await;
    // Meanwhile the controller placed the wallet elsewhere.
    sup.assign_unfenced(&[]);
    eventually(WAIT, "the moved wallet to be reported removed", || async {
        Ok(sup.removed(&wallet.task).then_some(()))
    })
    .await
    .expect("removed");
    assert!(containers_of(&rt, &wallet.task)
        .await
        .expect("list")
        .is_empty());
    sup.shutdown().await;
}

#[tokio::test]
async fn a_fenced_agent_stops_its_wallets_before_any_task_set() {
    let (node, rt, _guard) = node().await;
    // Left over from before an agent restart: a wallet and a service.
    let wallet = assignment("ltc-cccccc-0", Kind::Wallet, spec(&["sleep", "600"]));
    let web = assignment("web-cccccc-0", Kind::Service, spec(&["sleep", "600"]));
    rt.create_and_start(&wallet).await.expect("wallet");
    let web_id = rt.create_and_start(&web).await.expect("web");
    let sup = Sup::spawn(&rt, &node);
    sup.fence();
    let took = gone_within(&rt, &wallet.task, Duration::from_secs(5)).await;
    assert!(took < Duration::from_millis(1500), "took {took:?}");
    assert_eq!(
        rt.inspect(&web_id).await.expect("web kept").state,
        ContainerState::Running,
        "static stability for everything but wallets"
    );
    sup.shutdown().await;
}

fn http_probe(port: u16, path: &str) -> Probe {
    Probe {
        exec: None,
        http: Some(HttpProbe {
            port,
            path: path.to_string(),
        }),
        tcp: None,
        period: ApiDuration::from_millis(300),
        timeout: ApiDuration::from_millis(300),
        failure_threshold: 2,
        initial_delay: ApiDuration::from_secs(0),
    }
}

fn fast_restarts(mut s: TaskSpec) -> TaskSpec {
    s.restart.backoff.initial = ApiDuration::from_millis(200);
    s.restart.max_failures = 100;
    s
}

#[tokio::test]
async fn a_failing_liveness_probe_restarts_a_hung_container() {
    let (node, rt, _guard) = node().await;
    let sup = Sup::spawn(&rt, &node);
    // Serves /healthz for a second, then stops answering while staying alive.
    let mut s = fast_restarts(spec(&["hang", "8080", "1"]));
    s.probes.liveness = Some(http_probe(8080, "/healthz"));
    let a = assignment("hung-aaaaaa-0", Kind::Service, s);
    sup.assign(std::slice::from_ref(&a));
    let first = sup.reaches(&a.task, TaskPhase::Running).await;

    let restarted = eventually(WAIT, "the hung container to be restarted twice", || async {
        let s = sup.last_status(&a.task)?;
        if s.restarts < 2 || s.phase != TaskPhase::Running {
            bail!("last report {s:?}");
        }
        Ok(Some(s))
    })
    .await
    .expect("restarted");
    assert_eq!(
        restarted.container_id, first.container_id,
        "restarted in place, not replaced"
    );
    let why = sup
        .statuses(&a.task)
        .into_iter()
        .find_map(|s| s.message.filter(|m| m.starts_with("liveness probe failed")))
        .expect("the probe failure is reported");
    assert!(
        why.starts_with("liveness probe failed 2 times: GET /healthz: timed out after 300ms"),
        "{why}"
    );
    assert!(
        sup.statuses(&a.task).iter().all(|s| s.ready.is_none()),
        "no readiness probe, no readiness"
    );
    sup.shutdown().await;
}

#[tokio::test]
async fn readiness_probes_report_ready_and_not_ready() {
    let (node, rt, _guard) = node().await;
    let sup = Sup::spawn(&rt, &node);
    let mut tcp = spec(&["serve", "8080"]);
    tcp.probes.readiness = Some(Probe {
        tcp: Some(TcpProbe { port: 8080 }),
        http: None,
        ..http_probe(8080, "/")
    });
    let tcp = assignment("tcp-aaaaaa-0", Kind::Service, tcp);
    let mut hang = spec(&["hang", "8080", "2"]);
    hang.probes.readiness = Some(http_probe(8080, "/healthz"));
    let hang = assignment("hang-aaaaaa-0", Kind::Service, hang);
    sup.assign(&[tcp.clone(), hang.clone()]);

    for task in [&tcp.task, &hang.task] {
        eventually(WAIT, &format!("{task} to be ready"), || async {
            let s = sup.last_status(task)?;
            Ok((s.phase == TaskPhase::Running && s.ready == Some(true)).then_some(()))
        })
        .await
        .expect("ready");
        let first_running = sup
            .statuses(task)
            .into_iter()
            .find(|s| s.phase == TaskPhase::Running)
            .expect("running");
        assert_eq!(
            first_running.ready,
            Some(false),
            "not ready before the probe"
        );
    }
    // The hung server stops answering: not ready, yet not restarted (no liveness probe).
    let s = eventually(WAIT, "the hung task to be not ready", || async {
        let s = sup.last_status(&hang.task)?;
        Ok((s.ready == Some(false)).then_some(s))
    })
    .await
    .expect("not ready");
    assert_eq!((s.phase, s.restarts), (TaskPhase::Running, 0));
    sup.shutdown().await;
}

#[tokio::test]
async fn exec_probes_run_in_the_container() {
    let (node, rt, _guard) = node().await;
    let sup = Sup::spawn(&rt, &node);
    let exec = |code: &str| Probe {
        exec: Some(vec!["/testimg".into(), "exit".into(), code.into()]),
        http: None,
        timeout: ApiDuration::from_secs(2),
        ..http_probe(0, "/")
    };
    let mut ok = fast_restarts(spec(&["sleep", "600"]));
    ok.probes.liveness = Some(exec("0"));
    ok.probes.readiness = Some(exec("0"));
    let ok = assignment("ok-aaaaaa-0", Kind::Service, ok);
    let mut bad = fast_restarts(spec(&["sleep", "600"]));
    bad.probes.liveness = Some(exec("1"));
    let bad = assignment("bad-aaaaaa-0", Kind::Service, bad);
    sup.assign(&[ok.clone(), bad.clone()]);

    eventually(
        WAIT,
        "the failing exec probe to restart its task",
        || async {
            let s = sup.last_status(&bad.task)?;
            Ok((s.restarts >= 1).then_some(()))
        },
    )
    .await
    .expect("restarted");
    let why = sup
        .statuses(&bad.task)
        .into_iter()
        .find_map(|s| s.message.filter(|m| m.starts_with("liveness")))
        .expect("reported");
    assert!(
        why.starts_with("liveness probe failed 2 times: exec /testimg exit 1: exit code 1"),
        "{why}"
    );
    let s = eventually(WAIT, "the passing task to be ready", || async {
        let s = sup.last_status(&ok.task)?;
        Ok((s.ready == Some(true)).then_some(s))
    })
    .await
    .expect("ready");
    assert_eq!(
        (s.phase, s.ready, s.restarts),
        (TaskPhase::Running, Some(true), 0)
    );
    sup.shutdown().await;
}

/// A Job's spec: run to completion, never restarted on the node.
fn job(args: &[&str]) -> TaskSpec {
    TaskSpec {
        restart: Restart::default_for(Kind::Job),
        ..spec(args)
    }
}

#[tokio::test]
async fn a_failed_job_reports_its_exit_code_and_output_once() {
    let (node, rt, _guard) = node().await;
    let sup = Sup::spawn(&rt, &node);
    let a = assignment("job-aaaaaa-0", Kind::Job, job(&["exit", "3"]));
    sup.assign(std::slice::from_ref(&a));

    let s = sup.reaches(&a.task, TaskPhase::Failed).await;
    assert_eq!((s.exit_code, s.gave_up), (Some(3), false));
    assert_eq!(s.message.as_deref(), Some("exited with code 3"));
    assert_eq!(
        s.output.as_deref(),
        Some("testimg: exiting with code 3\n"),
        "stderr is part of the output"
    );
    // Later rounds find the same final status and send nothing (or no output) again.
    tokio::time::sleep(Duration::from_millis(300)).await;
    sup.desired.send_modify(|_| {}); // one more round at once
    tokio::time::sleep(Duration::from_millis(500)).await;
    let with_output = sup
        .statuses(&a.task)
        .iter()
        .filter(|s| s.output.is_some())
        .count();
    assert_eq!(with_output, 1, "{:?}", sup.statuses(&a.task));
    // A Hello (after a reconnect) carries it again: the first report may have been lost.
    let hello = sup.observer.observe().await.expect("observe");
    assert_eq!(hello[0].output, s.output);
    sup.shutdown().await;
}

#[tokio::test]
async fn a_job_past_its_timeout_is_stopped_and_reported_failed() {
    let (node, rt, _guard) = node().await;
    let sup = Sup::spawn(&rt, &node);
    let mut s = job(&["sleep", "100"]);
    s.timeout = Some(ApiDuration::from_secs(2));
    let a = assignment("slow-aaaaaa-0", Kind::Job, s);
    sup.assign(std::slice::from_ref(&a));

    let running = sup.reaches(&a.task, TaskPhase::Running).await;
    let started = Instant::now();
    let failed = sup.reaches(&a.task, TaskPhase::Failed).await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(6),
        "stopped {took:?} after running"
    );
    assert_eq!(failed.message.as_deref(), Some("timed out after 2s"));
    assert!(
        !failed.gave_up,
        "a failed attempt; the controller decides on retries"
    );
    let (start, end) = (
        running.started_at.expect("started"),
        failed.finished_at.expect("finished"),
    );
    let ran = (end - start).num_milliseconds();
    assert!((2000..6000).contains(&ran), "ran {ran} ms");
    // testimg exits at once on SIGTERM, saying so: the stopped run's output is kept.
    let output = failed.output.expect("output");
    assert!(output.contains("signal 15"), "{output:?}");
    // Not restarted here.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let listed = rt.list().await.expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].state, ContainerState::Exited);
    assert_eq!(
        sup.last_status(&a.task).expect("status").phase,
        TaskPhase::Failed
    );
    sup.shutdown().await;
}

#[tokio::test]
async fn a_jobs_output_is_cut_to_its_last_64_kib_at_a_line_start() {
    let (node, rt, _guard) = node().await;
    let sup = Sup::spawn(&rt, &node);
    let text = "payout-line-".repeat(4); // 48 bytes, then " N\n"
    let a = assignment(
        "chatty-aaaaaa-0",
        Kind::Job,
        job(&["print", &text, "0", "3000"]),
    );
    sup.assign(std::slice::from_ref(&a));

    let s = sup.reaches(&a.task, TaskPhase::Succeeded).await;
    let output = s.output.expect("output");
    let max = bramble_api::task::MAX_OUTPUT_BYTES;
    assert!(
        output.len() <= max && output.len() > max - 60,
        "{} bytes",
        output.len()
    );
    assert!(
        output.ends_with(&format!("{text} 3000\n")),
        "{:?}",
        &output[output.len() - 80..]
    );
    assert!(
        output.starts_with(&text),
        "starts at a line: {:?}",
        &output[..80]
    );
    for line in output.lines() {
        assert!(line.starts_with(&text), "whole lines only: {line:?}");
    }
    sup.shutdown().await;
}

/// Removes images when dropped, also when the test panics.
struct ImageGuard(Vec<String>);

impl Drop for ImageGuard {
    fn drop(&mut self) {
        let _ = std::process::Command::new("docker")
            .args(["rmi", "-f"])
            .args(&self.0)
            .output();
    }
}

/// Builds a copy of the test image with `labels` as `tag` (the classic builder, like
/// the test image itself: no registry, no buildx).
fn build_labelled_image(tag: &str, labels: &[String]) -> anyhow::Result<()> {
    let ctx = tempfile::tempdir()?;
    let mut dockerfile = format!("FROM {}\n", bramble_tests::TEST_IMAGE);
    for l in labels {
        dockerfile.push_str(&format!("LABEL {l}\n"));
    }
    std::fs::write(ctx.path().join("Dockerfile"), dockerfile)?;
    let out = std::process::Command::new("docker")
        .env("DOCKER_BUILDKIT", "0")
        .args(["build", "--quiet", "-t", tag])
        .arg(ctx.path())
        .output()?;
    if !out.status.success() {
        bail!("docker build: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// The image GC's prune call against the real engine, confined to two images made for
/// this test (by label), so no image another test needs can go: the one a container
/// uses stays, the unused one goes.
#[tokio::test]
async fn image_prune_removes_unused_images_only() {
    let (node, rt, _guard) = node().await;
    let label = format!("bramble.test-gc={node}");
    let used = format!("bramble-gc-test:{node}-used");
    let unused = format!("bramble-gc-test:{node}-unused");
    let keep = format!("bramble-gc-test:{node}-keep");
    let _images = ImageGuard(vec![used.clone(), unused.clone(), keep.clone()]);
    build_labelled_image(&used, &[label.clone(), "variant=used".into()]).expect("build");
    build_labelled_image(&unused, &[label.clone(), "variant=unused".into()]).expect("build");
    build_labelled_image(
        &keep,
        &[
            label.clone(),
            format!("{}=yes", bramble_agent::runtime::KEEP_IMAGE_LABEL),
        ],
    )
    .expect("build");
    let mut s = spec(&["sleep", "600"]);
    s.image = used.clone();
    // Created and stopped at once: a container that is not running still uses its image.
    let id = rt
        .create_and_start(&assignment("gc-aaaaaa-0", Kind::Job, s))
        .await
        .expect("container");
    rt.stop(&id, Duration::from_secs(5)).await.expect("stopped");

    let pruned = rt.prune_images(Some(&label)).await.expect("prune");
    assert_eq!(pruned.images, vec![unused.clone()], "{pruned:?}");
    assert!(docker_inspect(&used).is_ok(), "in use: kept");
    assert!(
        docker_inspect(&keep).is_ok(),
        "labelled {}: kept",
        bramble_agent::runtime::KEEP_IMAGE_LABEL
    );
    assert!(docker_inspect(&unused).is_err(), "unused: removed");
    assert!(
        docker_inspect(bramble_tests::TEST_IMAGE).is_ok(),
        "the parent image is untouched"
    );
}

/// A run sent ahead with the node's cron gate: its container runs at once, the image's
/// own entrypoint (the task sets args only) begins at the slot, and a run called off
/// before its slot ends at once without its command ever running.
#[tokio::test]
async fn a_gated_run_starts_ahead_runs_its_command_at_the_slot_and_can_be_called_off() {
    let (_, rt, _guard) = node().await;
    let gate = bramble_agent::gate::Gate::open(&bramble_tests::cron_gate().expect("gate"))
        .expect("a static gate");
    let rt = rt.with_gate(gate);
    let slot = chrono::Utc::now() + chrono::Duration::milliseconds(1500);
    let a = Assignment {
        not_before: Some(slot),
        ..assignment("g-aaaaaa-0", Kind::CronJob, spec(&["now"]))
    };
    let id = rt.prepare(&a).await.expect("prepared");
    let o = rt.inspect(&id).await.expect("inspect");
    assert_eq!(o.state, ContainerState::Running, "started ahead");
    assert!(o.started_at.is_some_and(|s| s < slot));
    assert_eq!(
        rt.output(&id, 100).await.expect("output"),
        "",
        "nothing ran yet"
    );
    let done = eventually(WAIT, "the run finished", || async {
        let o = rt.inspect(&id).await?;
        Ok((o.state == ContainerState::Exited).then_some(o))
    })
    .await
    .expect("finished");
    assert_eq!(done.exit_code, Some(0));
    let printed = rt.output(&id, 100).await.expect("output");
    let began: i64 = printed.trim().parse().expect("testimg now prints micros");
    assert!(
        began >= slot.timestamp_micros(),
        "the command began at {began}, before its slot {slot}"
    );
    rt.remove(&id).await.expect("removed");

    // Called off 5 s ahead of its slot: stopped at once (the gate is PID 1 and handles
    // SIGTERM), and the command never ran.
    let slot = chrono::Utc::now() + chrono::Duration::seconds(5);
    let a = Assignment {
        not_before: Some(slot),
        ..assignment("g-bbbbbb-0", Kind::CronJob, spec(&["now"]))
    };
    let id = rt.prepare(&a).await.expect("prepared");
    let t = Instant::now();
    rt.stop(&id, Duration::from_secs(10))
        .await
        .expect("stopped");
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "the gate waited for SIGKILL"
    );
    let o = rt.inspect(&id).await.expect("inspect");
    assert_eq!(o.exit_code, Some(143));
    let said = rt.output(&id, 500).await.expect("output");
    assert!(said.contains("the command did not run"), "{said:?}");
    assert!(!said.trim().chars().all(|c| c.is_ascii_digit()), "{said:?}");
    assert!(
        chrono::Utc::now() < slot,
        "the test was too slow to call it off ahead"
    );
}
