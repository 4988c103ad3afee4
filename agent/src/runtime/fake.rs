//! An in-memory [`Engine`] for the supervisor's unit tests: containers are plain
//! [`Observed`] values, every call is recorded, and failures can be arranged.
//!
//! Test-only, and only as faithful as those tests need: each call changes the containers
//! as the Docker engine would (a create starts the container, a stop leaves it exited,
//! a remove of a missing container succeeds), and every call completes at once. What
//! Docker itself does is tested against Docker (`agent/tests/runtime.rs`).

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bollard::errors::Error as DockerError;
use bramble_api::manifest::{Kind, Restart};
use bramble_api::task::{container_name, TaskSpec};
use bramble_api::wire::Assignment;
use chrono::{DateTime, Utc};
use futures_util::Stream;

use super::{last_output, ContainerState, Engine, Error, Observed, Result, RuntimeEvent};
use crate::host_paths;

/// A call the fake engine received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Call {
    /// `list`.
    List,
    /// `list_kind`.
    ListKind(Kind),
    /// `ensure_image`, also the one `create_and_start` makes first: the image.
    EnsureImage(String),
    /// `create_and_start` got as far as creating: the task.
    Create(String),
    /// `start`: the container.
    Start(String),
    /// `limit_cpu`: the container and its limit.
    LimitCpu(String, i64),
    /// `stop`: the container and the grace.
    Stop(String, Duration),
    /// `terminate`: the container and the grace.
    Terminate(String, Duration),
    /// `remove`: the container.
    Remove(String),
}

#[derive(Debug, Default)]
struct State {
    containers: Vec<Observed>,
    calls: Vec<Call>,
    created: u64,
    /// Images that cannot be pulled.
    missing_images: HashSet<String>,
    /// Containers whose removal fails.
    stuck: HashSet<String>,
    /// Containers that ignore SIGTERM: a stop takes the whole grace.
    stubborn: HashSet<String>,
    /// Containers' output.
    outputs: HashMap<String, String>,
    /// How many of the next `list` or `list_kind` calls fail.
    failing_lists: u32,
}

/// The fake engine of one node. Clones share the containers, as `Runtime` clones share
/// the engine.
#[derive(Debug, Clone)]
pub(crate) struct Fake {
    node: String,
    state: Arc<Mutex<State>>,
    host_paths: host_paths::Policy,
}

/// An engine's answer with an HTTP status, as bollard reports it.
fn docker_error(status_code: u16, message: &str) -> DockerError {
    DockerError::DockerResponseServerError {
        status_code,
        message: message.to_string(),
    }
}

/// A task of `kind` whose image is `img:1`, restarted per the kind's defaults.
pub(crate) fn assignment(task: &str, kind: Kind) -> Assignment {
    let spec = TaskSpec {
        sync: None,
        image: "img:1".into(),
        command: None,
        args: None,
        env: Default::default(),
        ports: vec![],
        volumes: vec![],
        resources: Default::default(),
        restart: Restart::default_for(kind),
        probes: Default::default(),
        timeout: None,
    };
    Assignment {
        restore_from: None,
        not_before: None,
        sync_to: Vec::new(),
        task: task.into(),
        kind,
        workload: task.rsplit_once('-').map_or(task, |(w, _)| w).into(),
        spec_hash: spec.hash(),
        spec,
        deadline: None,
        secrets: Default::default(),
        epoch: None,
    }
}

impl Fake {
    /// An engine with no containers.
    pub(crate) fn new(node: &str) -> Fake {
        Fake {
            node: node.to_string(),
            state: Arc::default(),
            host_paths: host_paths::Policy::default(),
        }
    }

    /// This engine with `policy` deciding which host paths containers may mount.
    pub(crate) fn with_host_paths(mut self, policy: host_paths::Policy) -> Fake {
        self.host_paths = policy;
        self
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A test that panicked while holding the lock has failed already.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Puts a container of `a` in `state` on the node, as if it were there before (no
    /// call is recorded); returns its id. `exited` is the exit code and how long the
    /// run lasted from `started_at`, for a container that ended.
    pub(crate) fn put(
        &self,
        a: &Assignment,
        state: ContainerState,
        started_at: DateTime<Utc>,
        exited: Option<(i64, chrono::Duration)>,
    ) -> String {
        let mut s = self.state();
        s.created += 1;
        let id = format!("old{}", s.created);
        let mut o = self.observed(&id, a, started_at);
        o.state = state;
        if let Some((code, ran)) = exited {
            o.exit_code = Some(code);
            o.finished_at = Some(started_at + ran);
        }
        s.containers.push(o);
        id
    }

    /// Sets the container's CPU limit as Docker holds it, as `docker update` would.
    pub(crate) fn set_nano_cpus(&self, id: &str, nano_cpus: Option<i64>) {
        let mut s = self.state();
        if let Some(c) = s.containers.iter_mut().find(|c| c.id == id) {
            c.nano_cpus = nano_cpus;
        }
    }

    /// Makes the container ignore SIGTERM: stopping it takes the whole grace.
    pub(crate) fn ignore_sigterm(&self, id: &str) {
        self.state().stubborn.insert(id.to_string());
    }

    /// A running container of `a`, started a minute ago; see [`Fake::put`].
    pub(crate) fn running(&self, a: &Assignment) -> String {
        let started = Utc::now() - chrono::Duration::minutes(1);
        self.put(a, ContainerState::Running, started, None)
    }

    fn observed(&self, id: &str, a: &Assignment, started_at: DateTime<Utc>) -> Observed {
        Observed {
            id: id.to_string(),
            name: container_name(&self.node, &a.task),
            task: a.task.clone(),
            workload: a.workload.clone(),
            kind: Some(a.kind),
            spec_hash: a.spec_hash.clone(),
            node: self.node.clone(),
            state: ContainerState::Running,
            host_ports: a
                .spec
                .ports
                .iter()
                .filter_map(|p| p.host_binding())
                .collect(),
            exit_code: None,
            oom_killed: false,
            error: None,
            created_at: Some(started_at),
            started_at: Some(started_at),
            finished_at: None,
            nano_cpus: super::nano_cpus(a),
        }
    }

    /// The node's containers now.
    pub(crate) fn containers(&self) -> Vec<Observed> {
        self.state().containers.clone()
    }

    /// Whether the container is on the node.
    pub(crate) fn has(&self, id: &str) -> bool {
        self.state().containers.iter().any(|c| c.id == id)
    }

    /// Every call so far, in order.
    pub(crate) fn calls(&self) -> Vec<Call> {
        self.state().calls.clone()
    }

    /// The tasks whose containers were created, in order.
    pub(crate) fn created(&self) -> Vec<String> {
        self.calls()
            .into_iter()
            .filter_map(|c| match c {
                Call::Create(task) => Some(task),
                _ => None,
            })
            .collect()
    }

    /// Pulls of `image` fail from now on.
    pub(crate) fn missing_image(&self, image: &str) {
        self.state().missing_images.insert(image.to_string());
    }

    /// Removals of the container fail (`true`) or work again (`false`).
    pub(crate) fn stuck(&self, id: &str, stuck: bool) {
        let mut s = self.state();
        if stuck {
            s.stuck.insert(id.to_string());
        } else {
            s.stuck.remove(id);
        }
    }

    /// What the container has written.
    pub(crate) fn output_of(&self, id: &str, text: &str) {
        self.state()
            .outputs
            .insert(id.to_string(), text.to_string());
    }

    /// The next `n` listings fail, as with the engine unreachable.
    pub(crate) fn failing_lists(&self, n: u32) {
        self.state().failing_lists = n;
    }

    fn listed(&self, call: Call, kind: Option<Kind>) -> Result<Vec<Observed>> {
        let mut s = self.state();
        s.calls.push(call);
        if s.failing_lists > 0 {
            s.failing_lists -= 1;
            return Err(Error::List(docker_error(500, "engine unreachable")));
        }
        let mut out: Vec<Observed> = s
            .containers
            .iter()
            .filter(|c| kind.is_none() || c.kind == kind)
            .cloned()
            .collect();
        out.sort_by(|a, b| (&a.task, a.created_at).cmp(&(&b.task, b.created_at)));
        Ok(out)
    }

    fn pull(&self, image: &str) -> Result<()> {
        let mut s = self.state();
        s.calls.push(Call::EnsureImage(image.to_string()));
        if s.missing_images.contains(image) {
            return Err(Error::ImagePull {
                image: image.to_string(),
                source: docker_error(404, "pull access denied"),
            });
        }
        Ok(())
    }

    /// Creates the task's container, running when `start`, else created only.
    fn create(&self, a: &Assignment, start: bool) -> Result<String> {
        // As the runtime does: before anything is pulled or made.
        self.host_paths
            .check_volumes(&a.spec.volumes)
            .map_err(|refused| Error::HostPath {
                task: a.task.clone(),
                refused,
            })?;
        self.pull(&a.spec.image)?;
        let mut s = self.state();
        s.calls.push(Call::Create(a.task.clone()));
        s.created += 1;
        let id = format!("c{}", s.created);
        let mut o = self.observed(&id, a, Utc::now());
        if !start {
            o.state = ContainerState::Created;
            o.started_at = None;
        }
        s.containers.push(o);
        Ok(id)
    }

    fn started(&self, id: &str) -> Result<()> {
        let mut s = self.state();
        s.calls.push(Call::Start(id.to_string()));
        let c = s.containers.iter_mut().find(|c| c.id == id);
        let c = c.ok_or_else(|| Error::NotFound { id: id.to_string() })?;
        c.state = ContainerState::Running;
        c.started_at = Some(Utc::now());
        c.exit_code = None;
        c.finished_at = None;
        Ok(())
    }

    fn limited(&self, id: &str, nano_cpus: i64) -> Result<()> {
        let mut s = self.state();
        s.calls.push(Call::LimitCpu(id.to_string(), nano_cpus));
        let c = s.containers.iter_mut().find(|c| c.id == id);
        let c = c.ok_or_else(|| Error::NotFound { id: id.to_string() })?;
        c.nano_cpus = Some(nano_cpus);
        Ok(())
    }

    fn stopped(&self, id: &str, grace: Duration) -> Result<()> {
        self.state().calls.push(Call::Stop(id.to_string(), grace));
        self.exited(id)
    }

    /// The container's process ended (after a stop).
    fn exited(&self, id: &str) -> Result<()> {
        let mut s = self.state();
        let c = s.containers.iter_mut().find(|c| c.id == id);
        let c = c.ok_or_else(|| Error::NotFound { id: id.to_string() })?;
        if c.state == ContainerState::Running {
            // SIGTERM's exit code: 128 + 15.
            c.state = ContainerState::Exited;
            c.exit_code = Some(143);
            c.finished_at = Some(Utc::now());
        }
        Ok(())
    }

    fn removed(&self, call: Call, id: &str) -> Result<()> {
        let mut s = self.state();
        s.calls.push(call);
        if s.stuck.contains(id) {
            return Err(Error::Remove {
                id: id.to_string(),
                source: docker_error(500, "device or resource busy"),
            });
        }
        s.containers.retain(|c| c.id != id);
        Ok(())
    }
}

impl Engine for Fake {
    fn node(&self) -> &str {
        &self.node
    }

    fn host_paths(&self) -> &host_paths::Policy {
        &self.host_paths
    }

    fn list(&self) -> impl Future<Output = Result<Vec<Observed>>> + Send {
        std::future::ready(self.listed(Call::List, None))
    }

    fn list_kind(&self, kind: Kind) -> impl Future<Output = Result<Vec<Observed>>> + Send {
        std::future::ready(self.listed(Call::ListKind(kind), Some(kind)))
    }

    fn ensure_image(&self, image: &str) -> impl Future<Output = Result<()>> + Send {
        std::future::ready(self.pull(image))
    }

    fn create_and_start(&self, a: &Assignment) -> impl Future<Output = Result<String>> + Send {
        std::future::ready(Fake::create(self, a, true))
    }

    fn create(&self, a: &Assignment) -> impl Future<Output = Result<String>> + Send {
        std::future::ready(Fake::create(self, a, false))
    }

    /// No gate here: a run sent ahead is only created, without its CPU limit, and
    /// started at its slot.
    fn prepare(&self, a: &Assignment) -> impl Future<Output = Result<String>> + Send {
        let created = Fake::create(self, a, false);
        if let Ok(id) = &created {
            self.set_nano_cpus(id, None);
        }
        std::future::ready(created)
    }

    fn start(&self, id: &str) -> impl Future<Output = Result<()>> + Send {
        std::future::ready(self.started(id))
    }

    fn limit_cpu(&self, id: &str, nano_cpus: i64) -> impl Future<Output = Result<()>> + Send {
        std::future::ready(self.limited(id, nano_cpus))
    }

    fn stop(&self, id: &str, grace: Duration) -> impl Future<Output = Result<()>> + Send {
        let (this, id) = (self.clone(), id.to_string());
        async move {
            if this.state().stubborn.contains(&id) {
                // Only the SIGKILL at the end of the grace ends it.
                this.state().calls.push(Call::Stop(id.clone(), grace));
                tokio::time::sleep(grace).await;
                return this.exited(&id);
            }
            this.stopped(&id, grace)
        }
    }

    fn terminate(&self, id: &str, grace: Duration) -> impl Future<Output = Result<()>> + Send {
        std::future::ready(self.removed(Call::Terminate(id.to_string(), grace), id))
    }

    fn remove(&self, id: &str) -> impl Future<Output = Result<()>> + Send {
        std::future::ready(self.removed(Call::Remove(id.to_string()), id))
    }

    fn output(&self, id: &str, max: usize) -> impl Future<Output = Result<String>> + Send {
        let text = self.state().outputs.get(id).cloned().unwrap_or_default();
        std::future::ready(Ok(last_output(text.as_bytes(), max)))
    }

    fn exec(&self, _id: &str, _cmd: &[String]) -> impl Future<Output = Result<i64>> + Send {
        std::future::ready(Ok(0))
    }

    fn address(&self, _id: &str) -> impl Future<Output = Result<Option<IpAddr>>> + Send {
        std::future::ready(Ok(None))
    }

    fn events(&self) -> impl Stream<Item = Result<RuntimeEvent>> + Send + 'static {
        // No events: the tests drive the supervisor through its desired state.
        futures_util::stream::pending()
    }
}
