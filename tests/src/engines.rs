//! A Docker Engine of its own for every test node, as every Pi has: each node's
//! `dockerd` runs in the node's network namespace with its own data root, exec root,
//! socket, containerd namespace and cgroup parent, so nodes have their own containers,
//! their own port space (two nodes can publish the same host port) and their own disk.
//! The agent reaches its engine through `DOCKER_HOST`.
//!
//! ```text
//!  host: containerd --config DIR/containerd/config.toml   (one, shared; CRI off)
//!  namespace NS:  dockerd -H unix://DIR/NODE/docker.sock --containerd-namespace NODE
//!                 --cgroup-parent /NODE --storage-driver vfs --bip 172.30.N.1/24
//!                 bramble-agent (DOCKER_HOST=unix://DIR/NODE/docker.sock)
//! ```
//!
//! Why so: `dockerd` under `ip netns exec` finds no devices cgroup (that command
//! remounts /sys), so it runs under `nsenter --net` instead; the host's daemon.json
//! (data root, storage driver) must not apply, so each engine reads an empty
//! `--config-file`; vfs needs no kernel overlay support. A relative `--cgroup-parent`
//! would land under containerd's own cgroup on cgroup v1 memory; the absolute one puts
//! every container under `/NODE/<id>` in every hierarchy, which is how a power-off finds
//! the container processes.
//!
//! A power-off kills the node's dockerd, every process in its namespace (the agent,
//! docker-proxy), its containerd shims and its container processes (frozen, killed,
//! thawed, through the cgroups): a Pi that loses power loses all of them at once. Its
//! data root stays: a power-on starts the same engine again.
//!
//! Cleanup is by Drop: every container removed and the engine stopped (SIGTERM, which
//! also unmounts its data root), or killed; leaked mounts under its directory unmounted
//! and its cgroups removed. [`crate::netns`]'s leftover sweep kills what a crashed run
//! left in its namespaces and the containerd and shims that name its cluster id.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::harness::{processes, run, signal};
use crate::netns::namespace_pids;

/// How long an engine gets to answer after it starts.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The containerd every node engine of a cluster shares (its own root, state and
/// socket; the machine's Docker keeps its own).
pub struct Containerd {
    child: Child,
    socket: PathBuf,
    dir: PathBuf,
}

impl Containerd {
    /// Starts it with its files under `dir` and waits until its socket answers.
    pub fn start(dir: &Path) -> Result<Containerd> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let socket = dir.join("containerd.sock");
        let config = dir.join("config.toml");
        fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{}\"\nstate = \"{}\"\n\
                 disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
                 [grpc]\n  address = \"{}\"\n",
                dir.join("root").display(),
                dir.join("state").display(),
                socket.display()
            ),
        )
        .context("writing containerd's config")?;
        let log = fs::File::create(dir.join("containerd.log"))?;
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()
            .context("starting containerd (Debian's containerd, which docker.io installs)")?;
        let mut c = Containerd {
            child,
            socket,
            dir: dir.to_path_buf(),
        };
        let deadline = Instant::now() + START_TIMEOUT;
        while !c.socket.exists() {
            if let Ok(Some(status)) = c.child.try_wait() {
                bail!(
                    "containerd exited with {status}: {}",
                    fs::read_to_string(c.dir.join("containerd.log")).unwrap_or_default()
                );
            }
            if Instant::now() > deadline {
                bail!("containerd made no socket within {START_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(c)
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One node's Docker Engine; see the module docs.
pub struct Engine {
    node: String,
    ns: String,
    dir: PathBuf,
    containerd: PathBuf,
    bip: String,
    child: Option<Child>,
    starts: u32,
}

impl Engine {
    /// Starts the engine of `node` in namespace `ns`, its files under `dir`, its
    /// containers' bridge on `bip` (e.g. `172.30.3.1/24`), and waits until it answers.
    pub fn start(
        containerd: &Containerd,
        ns: &str,
        node: &str,
        dir: &Path,
        bip: &str,
    ) -> Result<Engine> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        // The host's daemon.json (its data root and storage driver) must not apply.
        fs::write(dir.join("daemon.json"), "{}").context("writing daemon.json")?;
        let mut e = Engine {
            node: node.to_string(),
            ns: ns.to_string(),
            dir: dir.to_path_buf(),
            containerd: containerd.socket.clone(),
            bip: bip.to_string(),
            child: None,
            starts: 0,
        };
        e.boot()?;
        Ok(e)
    }

    /// Whether it runs (not powered off).
    pub fn is_on(&self) -> bool {
        self.child.is_some()
    }

    /// The dockerd process, while it runs (`nsenter` execs it: same pid).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `unix://…/docker.sock`: what `DOCKER_HOST` of the node's agent says.
    pub fn host(&self) -> String {
        format!("unix://{}", self.dir.join("docker.sock").display())
    }

    /// `docker -H <this engine>` (arguments to be added).
    pub fn docker(&self) -> Command {
        let mut c = Command::new("docker");
        c.args(["-H", &self.host()]);
        c
    }

    /// Copies an image from the machine's engine into this one.
    pub fn load(&self, image: &str) -> Result<()> {
        let mut save = Command::new("docker")
            .args(["save", image])
            .stdout(Stdio::piped())
            .spawn()
            .context("docker save")?;
        let stdout = save.stdout.take().context("docker save's output")?;
        let out = self
            .docker()
            .arg("load")
            .stdin(Stdio::from(stdout))
            .output()
            .context("docker load")?;
        let saved = save.wait()?;
        if !saved.success() || !out.status.success() {
            bail!(
                "loading {image} into {}'s engine: {}",
                self.node,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// Starts the engine (again, after [`Engine::power_off`]) and waits until it answers.
    pub fn boot(&mut self) -> Result<()> {
        self.starts += 1;
        let _ = fs::remove_file(self.dir.join("docker.pid"));
        let log = fs::File::create(self.dir.join(format!("dockerd-{}.log", self.starts)))?;
        let net = format!("--net=/run/netns/{}", self.ns);
        let child = Command::new("nsenter")
            .arg(&net)
            .arg("--")
            .arg("dockerd")
            .arg("--config-file")
            .arg(self.dir.join("daemon.json"))
            .args(["--storage-driver", "vfs"])
            .arg("--data-root")
            .arg(self.dir.join("data"))
            .arg("--exec-root")
            .arg(self.dir.join("exec"))
            .args(["-H", &self.host()])
            .arg("--pidfile")
            .arg(self.dir.join("docker.pid"))
            .arg("--containerd")
            .arg(&self.containerd)
            .args(["--containerd-namespace", &self.node])
            .args([
                "--containerd-plugins-namespace",
                &format!("{}-p", self.node),
            ])
            .args(["--cgroup-parent", &format!("/{}", self.node)])
            .args(["--bip", &self.bip])
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()
            .context("starting dockerd (nsenter and Debian's docker.io)")?;
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let info = self.docker().args(["info", "--format", "{{.ID}}"]).output();
            if info.is_ok_and(|o| o.status.success()) {
                return Ok(());
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                bail!(
                    "{}'s dockerd exited with {status}:\n{}",
                    self.node,
                    self.logs()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "{}'s dockerd did not answer within {START_TIMEOUT:?}:\n{}",
                    self.node,
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The last lines dockerd printed.
    pub fn logs(&self) -> String {
        let text = fs::read_to_string(self.dir.join(format!("dockerd-{}.log", self.starts)))
            .unwrap_or_default();
        crate::harness::tail(&text, 30)
    }

    /// The node loses power: its dockerd, every process in its namespace (its agent
    /// too), its containerd shims and its container processes are killed at once.
    pub fn power_off(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let mut pids = namespace_pids(&self.ns);
        let node = self.node.clone();
        pids.extend(processes("containerd-shim-runc-v2", |a| a == node));
        for pid in &pids {
            signal(*pid, "KILL");
        }
        self.kill_containers();
        let deadline = Instant::now() + Duration::from_secs(10);
        while pids
            .iter()
            .any(|p| Path::new(&format!("/proc/{p}")).exists())
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the processes of every container of the node, found through its cgroups:
    /// frozen first (cgroup v1 freezer), so none forks away meanwhile; with cgroup v2,
    /// `cgroup.kill`.
    fn kill_containers(&self) {
        let v1 = Path::new("/sys/fs/cgroup/freezer").join(&self.node);
        let v2 = Path::new("/sys/fs/cgroup").join(&self.node);
        if v1.is_dir() {
            for dir in fs::read_dir(&v1).into_iter().flatten().flatten() {
                let cg = dir.path();
                if !cg.is_dir() {
                    continue;
                }
                let _ = fs::write(cg.join("freezer.state"), "FROZEN");
                for pid in fs::read_to_string(cg.join("cgroup.procs"))
                    .unwrap_or_default()
                    .split_whitespace()
                    .filter_map(|p| p.parse().ok())
                {
                    signal(pid, "KILL");
                }
                let _ = fs::write(cg.join("freezer.state"), "THAWED");
            }
        } else if v2.join("cgroup.procs").exists() {
            for dir in fs::read_dir(&v2).into_iter().flatten().flatten() {
                let _ = fs::write(dir.path().join("cgroup.kill"), "1");
            }
        }
    }

    /// Removes the node's cgroup directories (left behind once its containers are gone).
    fn remove_cgroups(&self) {
        for hierarchy in fs::read_dir("/sys/fs/cgroup")
            .into_iter()
            .flatten()
            .flatten()
        {
            let parent = hierarchy.path().join(&self.node);
            if !parent.is_dir() {
                continue;
            }
            for dir in fs::read_dir(&parent).into_iter().flatten().flatten() {
                if dir.path().is_dir() {
                    let _ = fs::remove_dir(dir.path());
                }
            }
            let _ = fs::remove_dir(&parent);
        }
    }

    /// Unmounts what a killed engine left mounted under its directory.
    fn unmount_leftovers(&self) {
        let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let mut points: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1))
            .filter(|p| Path::new(p).starts_with(&self.dir))
            .collect();
        // Deepest first.
        points.sort_by_key(|p| std::cmp::Reverse(p.len()));
        for p in points {
            let _ = Command::new("umount").arg("-l").arg(p).output();
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if self.child.is_some() {
            // Containers first, then a clean stop, which unmounts the data root.
            if let Ok(ids) = run(self.docker().args(["ps", "-aq"])) {
                let ids: Vec<&str> = ids.split_whitespace().collect();
                if !ids.is_empty() {
                    let _ = self.docker().args(["rm", "-f"]).args(ids).output();
                }
            }
            if let Some(mut c) = self.child.take() {
                signal(c.id(), "TERM");
                let deadline = Instant::now() + Duration::from_secs(10);
                while !matches!(c.try_wait(), Ok(Some(_))) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(50));
                }
                self.child = Some(c);
            }
        }
        self.power_off();
        self.unmount_leftovers();
        self.remove_cgroups();
    }
}

/// Processes of engines left behind by crashed runs whose cluster ids are `stale`
/// (containerd and its shims; dockerd and the rest die with their namespaces).
pub(crate) fn stale_processes(stale: &dyn Fn(&str) -> bool) -> Vec<u32> {
    let mut pids = processes("containerd", |a| {
        Path::new(a)
            .components()
            .any(|c| c.as_os_str().to_str().is_some_and(stale))
    });
    pids.extend(processes("containerd-shim-runc-v2", stale));
    pids
}
