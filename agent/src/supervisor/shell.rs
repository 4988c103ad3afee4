//! The supervisor's I/O shell: observes Docker, runs the pure [`plan`], executes its
//! actions and reports task states to the link.
//!
//! [`Supervisor::run`] converges on every change of the desired state, every Docker
//! event of the node's containers, every probe verdict, when a back-off ends, and every
//! [`RESYNC_INTERVAL`]. It starts one prober per probed container run (see
//! [`crate::probe`]) and the fence sweeper (see `sweeper`), and Wallet starts go through
//! the sweeper's gate. [`Observer`] reads the node's tasks for the link's Hello.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bramble_api::manifest::Kind;
use bramble_api::task::{TaskPhase, MAX_OUTPUT_BYTES};
use bramble_api::wire::{AgentMessage, Assignment, TaskStatus};
use chrono::{DateTime, Utc};
use futures_util::{FutureExt, Stream, StreamExt};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, instrument, warn};

use super::lanes::{lanes, MAX_PARALLEL};
use super::planner::{
    observed_status, pick_keeper, plan, probe_targets, Action, Failure, RemoveReason,
    RestartTracker,
};
use super::sweeper::{enforce_fence, Gate};
use super::{Desired, RESYNC_INTERVAL};
use crate::fence;
use crate::probe::{self, Run, Verdict};
use crate::runtime::{self, error_chain, ContainerState, Engine, Observed, Runtime, RuntimeEvent};

/// How long a removed container gets to stop after SIGTERM before SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(10);

/// How long to wait before subscribing to Docker events again after the stream broke.
const EVENTS_RETRY: Duration = Duration::from_secs(1);

/// At most this much run output goes into one Hello, so it stays far below the frame
/// limit ([`bramble_api::wire::MAX_FRAME_BYTES`]) however many finished runs the node
/// keeps; runs beyond it are reported without output.
pub const HELLO_OUTPUT_BUDGET: usize = 1 << 20;

/// What one lane of a round did (see [`Supervisor::lane`]).
#[derive(Default)]
struct LaneOutcome<'a> {
    /// Something was changed in Docker.
    acted: bool,
    /// The earliest back-off end among its tasks.
    wake: Option<DateTime<Utc>>,
    /// Containers it stopped or removed.
    touched: Vec<&'a str>,
    /// The tasks its actions were for.
    tasks: Vec<&'a str>,
    /// Each action's index, outcome and when it ended, for the restart history.
    done: Vec<(usize, Result<(), Failure>, DateTime<Utc>)>,
}

/// Folds the outcomes of `lanes` into `tracker` in plan order, as if their actions had
/// run one by one.
fn fold(tracker: &mut RestartTracker, actions: &[Action], lanes: &[LaneOutcome<'_>]) {
    let mut done: Vec<&(usize, Result<(), Failure>, DateTime<Utc>)> =
        lanes.iter().flat_map(|o| o.done.iter()).collect();
    done.sort_by_key(|(i, _, _)| *i);
    for (i, outcome, at) in done {
        tracker.apply(&actions[*i], outcome.clone(), *at);
    }
}

/// The last status sent per task, shared between the supervisor and its observers.
type Sent = Arc<Mutex<HashMap<String, TaskStatus>>>;

fn lock(sent: &Sent) -> std::sync::MutexGuard<'_, HashMap<String, TaskStatus>> {
    // A panic while holding this lock cannot leave the map half-updated (single
    // inserts and removes), so a poisoned lock is still usable.
    sent.lock().unwrap_or_else(|p| p.into_inner())
}

/// Reads the node's current tasks, for the Hello message of each (re)connection.
/// Cheap to clone; usable while the supervisor runs.
///
/// Generic over the container engine like [`Supervisor`]; Docker's by default.
#[derive(Debug, Clone)]
pub struct Observer<R = Runtime> {
    runtime: R,
    sent: Sent,
}

impl<R: Engine> Observer<R> {
    /// The node's tasks: one status per task container found in Docker (the last status
    /// the supervisor reported for it, which knows restarts and give-ups, or else one
    /// derived from the container), plus the last status of tasks that have no container
    /// (e.g. an image that cannot be pulled).
    #[instrument(skip(self), fields(node = %self.runtime.node()))]
    pub async fn observe(&self) -> runtime::Result<Vec<TaskStatus>> {
        let observed = self.runtime.list().await?;
        let sent = lock(&self.sent).clone();
        let mut out: HashMap<String, TaskStatus> = HashMap::new();
        let mut by_task: HashMap<&str, Vec<&Observed>> = HashMap::new();
        for o in &observed {
            by_task.entry(o.task.as_str()).or_default().push(o);
        }
        let mut budget = HELLO_OUTPUT_BUDGET;
        for (task, containers) in by_task {
            if let Some(c) = pick_keeper(&containers) {
                let mut status = sent
                    .get(task)
                    .cloned()
                    .unwrap_or_else(|| observed_status(c));
                // A finished run's output again: its Status may have been lost with the
                // link (reports queued while it was down are dropped for the Hello).
                let finished_run = c.kind.is_some_and(|k| k.runs_to_completion())
                    && c.state == ContainerState::Exited
                    && is_finished(status.phase)
                    && status.container_id.as_deref() == Some(c.id.as_str());
                if finished_run && budget > 0 {
                    status.output = read_output(&self.runtime, task, &c.id).await;
                    let used = status.output.as_ref().map_or(0, String::len);
                    if used > budget {
                        // Over the frame's budget: left out (the controller may have it).
                        status.output = None;
                        budget = 0;
                    } else {
                        budget -= used;
                    }
                }
                out.insert(task.to_string(), status);
            }
        }
        for (task, status) in sent {
            out.entry(task).or_insert(status);
        }
        let mut out: Vec<TaskStatus> = out.into_values().collect();
        out.sort_by(|a, b| a.task.cmp(&b.task));
        Ok(out)
    }
}

type Events = Pin<Box<dyn Stream<Item = runtime::Result<RuntimeEvent>> + Send>>;

/// A spawned task that is aborted when this handle is dropped, so no prober or sweeper
/// outlives the supervisor, whichever way its `run` ends.
#[derive(Debug)]
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The prober of one task's current container run.
#[derive(Debug)]
struct Prober {
    run: Run,
    _task: AbortOnDrop,
}

/// The async shell around [`plan`]: observes Docker, executes the plan, reports.
///
/// Generic over the container engine ([`Engine`]): Docker's [`Runtime`] in the agent
/// (the default), an in-memory one in this module's tests.
#[derive(Debug)]
pub struct Supervisor<R = Runtime> {
    runtime: R,
    node: String,
    out: mpsc::Sender<AgentMessage>,
    tracker: RestartTracker,
    sent: Sent,
    /// Held while a Wallet is created or started, and while the fence sweeper stops
    /// Wallets: a start that raced a fence has finished before the sweep looks.
    gate: Gate,
    /// Probers by task.
    probers: HashMap<String, Prober>,
    probe_tx: mpsc::Sender<probe::Report>,
    probe_rx: Option<mpsc::Receiver<probe::Report>>,
}

impl<R: Engine> Supervisor<R> {
    /// A supervisor for `node`'s containers, sending task reports to `out`.
    pub fn new(runtime: R, node: String, out: mpsc::Sender<AgentMessage>) -> Self {
        let (probe_tx, probe_rx) = mpsc::channel(64);
        Supervisor {
            runtime,
            node,
            out,
            tracker: RestartTracker::new(),
            sent: Sent::default(),
            gate: Gate::default(),
            probers: HashMap::new(),
            probe_tx,
            probe_rx: Some(probe_rx),
        }
    }

    /// The runtime, e.g. for streaming logs (clone it: it is a cheap handle).
    pub fn runtime(&self) -> &R {
        &self.runtime
    }

    /// An observer of this supervisor's tasks that stays usable after [`Self::run`]
    /// has taken the supervisor.
    pub fn observer(&self) -> Observer<R> {
        Observer {
            runtime: self.runtime.clone(),
            sent: Arc::clone(&self.sent),
        }
    }

    /// The node's current tasks, for the Hello message. See [`Observer::observe`].
    pub async fn observe(&self) -> runtime::Result<Vec<TaskStatus>> {
        self.observer().observe().await
    }

    /// Converges until `shutdown` completes, then returns, leaving every container as it
    /// is (an agent restart is not a task kill); probers stop with it.
    ///
    /// Does nothing until `desired` holds a task set: before the controller has spoken,
    /// the node keeps running what it has. Fencing is the exception: whenever `desired`
    /// says fenced, the node's Wallets are stopped, task set or not. Then it converges on
    /// every change of `desired`, every Docker event of the node's containers, every
    /// probe verdict, when a back-off delay ends, and every [`RESYNC_INTERVAL`]. A failed
    /// round (Docker unreachable) is logged and retried at the next trigger; it never
    /// ends the loop.
    #[instrument(skip_all, fields(node = %self.node))]
    pub async fn run(
        mut self,
        mut desired: watch::Receiver<Desired>,
        shutdown: impl Future<Output = ()>,
    ) {
        let _sweeper = AbortOnDrop(tokio::spawn(enforce_fence(
            self.runtime.clone(),
            desired.clone(),
            self.gate.clone(),
        )));
        let mut probe_rx = self
            .probe_rx
            .take()
            .expect("run consumes the supervisor, so the receiver is still there");
        let mut shutdown = std::pin::pin!(shutdown);
        let (mut current, mut fenced) = loop {
            let d = desired.borrow_and_update().clone();
            if let Some(set) = d.tasks {
                break (set, d.fenced);
            }
            tokio::select! {
                () = &mut shutdown => return,
                changed = desired.changed() => {
                    if changed.is_err() {
                        // The controller link is gone before it ever spoke: nothing to do.
                        shutdown.await;
                        return;
                    }
                }
            }
        };
        info!(
            tasks = current.len(),
            fenced, "first task set received; supervising"
        );
        let mut desired_open = true;
        let mut events: Option<Events> = Some(Box::pin(self.runtime.events()));
        let mut events_retry = tokio::time::Instant::now();
        let mut resync = tokio::time::interval(RESYNC_INTERVAL);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        resync.reset();
        loop {
            let wake = self.converge(&current, fenced, &desired).await;
            let wake_at = wake.map(|at| {
                let wait = (at - Utc::now()).to_std().unwrap_or(Duration::ZERO);
                tokio::time::Instant::now() + wait
            });
            tokio::select! {
                biased;
                () = &mut shutdown => break,
                changed = desired.changed(), if desired_open => {
                    match changed {
                        Ok(()) => {
                            let d = desired.borrow_and_update().clone();
                            // None never replaces a task set the controller sent.
                            if let Some(set) = d.tasks {
                                current = set;
                            }
                            fenced = d.fenced;
                        }
                        // The link is gone for good: keep running the last set.
                        Err(_) => desired_open = false,
                    }
                }
                Some(report) = probe_rx.recv() => self.probed(&report),
                event = next_event(&mut events) => {
                    match event {
                        Some(Ok(e)) => {
                            debug!(container = %e.id, task = ?e.task, action = ?e.action, exit_code = ?e.exit_code, "docker event");
                            drain_ready(&mut events);
                        }
                        Some(Err(e)) => {
                            warn!(error = %error_chain(&e), "docker event stream failed; resubscribing");
                            events = None;
                            events_retry = tokio::time::Instant::now() + EVENTS_RETRY;
                        }
                        None => {
                            warn!("docker event stream ended; resubscribing");
                            events = None;
                            events_retry = tokio::time::Instant::now() + EVENTS_RETRY;
                        }
                    }
                }
                () = tokio::time::sleep_until(events_retry), if events.is_none() => {
                    events = Some(Box::pin(self.runtime.events()));
                }
                () = sleep_until_opt(wake_at), if wake_at.is_some() => {}
                _ = resync.tick() => {}
            }
        }
        info!("supervisor stopped; containers left running");
    }

    /// Folds a probe verdict into the history; the next round acts on it.
    fn probed(&mut self, report: &probe::Report) {
        match &report.verdict {
            Verdict::LivenessFailed(message) => {
                warn!(task = %report.task, container = %report.run.container, message = %message, "liveness probe failed; restarting the container");
            }
            Verdict::Ready(ready) => {
                info!(task = %report.task, container = %report.run.container, ready, "readiness changed");
            }
        }
        self.tracker.probed(report);
    }

    /// One or two rounds of observe → plan → execute; returns when the next back-off
    /// ends, if any. A second round follows a round that changed something, so the
    /// resulting states (e.g. Running) are reported at once.
    async fn converge(
        &mut self,
        desired: &[Assignment],
        fenced: bool,
        latest: &watch::Receiver<Desired>,
    ) -> Option<DateTime<Utc>> {
        let mut wake = None;
        for _ in 0..2 {
            match self.round(desired, fenced, latest).await {
                Ok((acted, w)) => {
                    wake = w;
                    if !acted {
                        break;
                    }
                }
                Err(e) => {
                    warn!(error = %error_chain(&e), "cannot observe containers; retrying later");
                    break;
                }
            }
        }
        wake
    }

    /// Observes, plans and executes once. Returns whether anything was changed in
    /// Docker and the earliest back-off end. `latest` is the desired state's channel, to
    /// see a fence or a newer task set that arrives while the round runs.
    #[instrument(skip_all, fields(node = %self.node))]
    async fn round(
        &mut self,
        desired: &[Assignment],
        fenced: bool,
        latest: &watch::Receiver<Desired>,
    ) -> runtime::Result<(bool, Option<DateTime<Utc>>)> {
        let observed = self.runtime.list().await?;
        let now = Utc::now();
        self.tracker.retain(desired, now);
        self.check_host_paths(desired);
        let actions = plan(desired, &observed, &self.tracker, now, fenced);
        let wallets: HashSet<&str> = desired
            .iter()
            .filter(|a| a.kind == Kind::Wallet)
            .map(|a| a.task.as_str())
            .collect();
        let completing: HashSet<&str> = desired
            .iter()
            .filter(|a| a.kind.runs_to_completion())
            .map(|a| a.task.as_str())
            .collect();
        // Independent actions run side by side (see `lanes`); the history takes their
        // outcomes afterwards, in plan order, as if they had run one by one.
        let this = &*self;
        let all = lanes(&actions, desired, &observed);
        let count = all.len();
        let mut running = futures_util::stream::iter(all)
            .map(|lane| this.lane(lane, &actions, &wallets, &completing, latest))
            .buffer_unordered(MAX_PARALLEL);
        let mut outcomes: Vec<LaneOutcome<'_>> = Vec::with_capacity(count);
        while let Some(o) = running.next().await {
            let acted = o.acted;
            outcomes.push(o);
            // A lane that started something while others still run (a container
            // taking its stop grace): its new state is reported now, not when the
            // slowest lane is done.
            if acted && outcomes.len() < count {
                this.report_early(desired, fenced, &actions, &outcomes, &completing)
                    .await;
            }
        }
        drop(running);
        fold(&mut self.tracker, &actions, &outcomes);
        let mut acted = false;
        let mut wake: Option<DateTime<Utc>> = None;
        // Containers stopped or removed in this round: they get no prober.
        let mut touched: HashSet<&str> = HashSet::new();
        for o in outcomes {
            acted |= o.acted;
            if let Some(w) = o.wake {
                wake = Some(wake.map_or(w, |x| x.min(w)));
            }
            touched.extend(o.touched);
        }

        // Tasks reported earlier that are neither assigned nor in Docker any more (e.g.
        // unassigned while their image could not be pulled): confirm them gone too.
        let wanted: HashSet<&str> = desired.iter().map(|a| a.task.as_str()).collect();
        let present: HashSet<&str> = observed.iter().map(|o| o.task.as_str()).collect();
        let orphans: Vec<String> = lock(&self.sent)
            .keys()
            .filter(|t| !wanted.contains(t.as_str()) && !present.contains(t.as_str()))
            .cloned()
            .collect();
        for task in orphans {
            self.report_removed(&task).await;
        }
        let untouched: Vec<Observed> = observed
            .iter()
            .filter(|o| !touched.contains(o.id.as_str()))
            .cloned()
            .collect();
        self.sync_probers(desired, &untouched);
        Ok((acted, wake))
    }

    /// Reports the states of the tasks of the lanes done so far (`done`), as the next
    /// round would: observed afresh, planned with their outcomes in the history.
    async fn report_early(
        &self,
        desired: &[Assignment],
        fenced: bool,
        actions: &[Action],
        done: &[LaneOutcome<'_>],
        completing: &HashSet<&str>,
    ) {
        let Ok(observed) = self.runtime.list().await else {
            // The round's end observes again and reports.
            return;
        };
        let mut tracker = self.tracker.clone();
        fold(&mut tracker, actions, done);
        let tasks: HashSet<&str> = done.iter().flat_map(|o| o.tasks.iter().copied()).collect();
        for action in plan(desired, &observed, &tracker, Utc::now(), fenced) {
            if let Action::Report { status } = action {
                if tasks.contains(status.task.as_str()) {
                    self.report(&status, completing.contains(status.task.as_str()))
                        .await;
                }
            }
        }
    }

    /// Runs one lane's actions (indexes into `actions`) one after another.
    async fn lane<'a>(
        &self,
        lane: Vec<usize>,
        actions: &'a [Action],
        wallets: &HashSet<&str>,
        completing: &HashSet<&str>,
        latest: &watch::Receiver<Desired>,
    ) -> LaneOutcome<'a> {
        let mut out = LaneOutcome::default();
        let mut not_removed: HashSet<&str> = HashSet::new();
        for i in lane {
            let action = &actions[i];
            out.tasks.push(action.task());
            let wallet_start = match action {
                Action::Create { assignment } => assignment.kind == Kind::Wallet,
                Action::Start { task, .. } | Action::Restart { task, .. } => {
                    wallets.contains(task.as_str())
                }
                _ => false,
            };
            // A Wallet's image is pulled before the gate is taken: a pull can take
            // minutes, and a fence must not wait for it.
            let pulled = match action {
                Action::Create { assignment } if wallet_start => {
                    self.runtime.ensure_image(&assignment.spec.image).await
                }
                _ => Ok(()),
            };
            let _gate = if wallet_start && pulled.is_ok() {
                let Some(gate) = self.gate.admit(latest).await else {
                    debug!(
                        ?action,
                        "wallet start skipped: fenced, or a newer task set arrived"
                    );
                    continue;
                };
                Some(gate)
            } else {
                None
            };
            let outcome = match (pulled, action) {
                (Err(e), _) => Err(e),
                (Ok(()), Action::Report { status }) => {
                    let completing = completing.contains(status.task.as_str());
                    self.report(status, completing).await;
                    continue;
                }
                (Ok(()), Action::Wait { until, .. }) => {
                    out.wake = Some(out.wake.map_or(*until, |w| w.min(*until)));
                    continue;
                }
                (Ok(()), Action::ReportRemoved { task }) => {
                    if !not_removed.contains(task.as_str()) {
                        self.report_removed(task).await;
                    }
                    continue;
                }
                (Ok(()), Action::GiveUp { task, message }) => {
                    warn!(task = %task, message = %message, "giving the task up");
                    Ok(())
                }
                (Ok(()), Action::Create { assignment }) => {
                    out.acted = true;
                    info!(task = %assignment.task, image = %assignment.spec.image, "creating container");
                    self.runtime.create_and_start(assignment).await.map(|_| ())
                }
                (Ok(()), Action::Prepare { assignment }) => {
                    out.acted = true;
                    info!(task = %assignment.task, image = %assignment.spec.image, not_before = ?assignment.not_before, "creating container ahead of its start");
                    self.runtime.prepare(assignment).await.map(|_| ())
                }
                (
                    Ok(()),
                    Action::Start {
                        id,
                        task,
                        at,
                        nano_cpus,
                    },
                ) => {
                    out.acted = true;
                    if let Some(at) = at {
                        // At most PLANNED_AHEAD: the start waits for the run's instant.
                        let wait = (*at - Utc::now()).to_std().unwrap_or(Duration::ZERO);
                        tokio::time::sleep(wait).await;
                    }
                    info!(task = %task, container = %id, "starting container");
                    let started = self.runtime.start(id).await;
                    if let (Ok(()), Some(n)) = (&started, nano_cpus) {
                        // The start stands: the next round sees the limit missing and
                        // sets it again (a LimitCpu).
                        if let Err(e) = self.runtime.limit_cpu(id, *n).await {
                            warn!(task = %task, container = %id, error = %error_chain(&e), "cannot set the CPU limit right after the start");
                        }
                    }
                    started
                }
                (
                    Ok(()),
                    Action::Restart {
                        id,
                        task,
                        nano_cpus,
                        ..
                    },
                ) => {
                    out.acted = true;
                    info!(task = %task, container = %id, restarts = self.tracker.restarts(task) + 1, "restarting container");
                    self.restart(id, task, *nano_cpus).await
                }
                (
                    Ok(()),
                    Action::LimitCpu {
                        id,
                        task,
                        nano_cpus,
                    },
                ) => {
                    out.acted = true;
                    warn!(task = %task, container = %id, nano_cpus, "setting the CPU limit the container runs without");
                    self.runtime.limit_cpu(id, *nano_cpus).await
                }
                (Ok(()), Action::Stop { id, task, cause }) => {
                    out.acted = true;
                    out.touched.push(id.as_str());
                    warn!(task = %task, container = %id, cause = %cause, "stopping an unhealthy container");
                    self.runtime.stop(id, STOP_GRACE).await
                }
                (Ok(()), Action::Remove { id, task, reason }) => {
                    out.acted = true;
                    out.touched.push(id.as_str());
                    let r = if *reason == RemoveReason::Fenced {
                        warn!(task = %task, container = %id, "removing a wallet: the node is fenced");
                        self.runtime.terminate(id, fence::GRACE).await
                    } else {
                        info!(task = %task, container = %id, ?reason, "removing container");
                        self.stop_and_remove(id).await
                    };
                    if r.is_err() {
                        not_removed.insert(task.as_str());
                    }
                    r
                }
            };
            let outcome = outcome.map_err(|e| {
                let reason = e.reason();
                let message = crate::runtime::tidy(&error_chain(&e), reason);
                warn!(error = %message, %reason, ?action, "action failed");
                Failure { reason, message }
            });
            out.done.push((i, outcome, Utc::now()));
        }
        out
    }

    /// Starts an exited container again. One with a CPU limit has it widened to the
    /// whole node for the start and put back right after, whatever the start did: a
    /// start under the limit waits for runc's set-up to fit the quota (see
    /// [`crate::runtime::Runtime::create_and_start`]). If it cannot be widened, the
    /// start goes on under the limit; if it cannot be put back, the next round's
    /// `LimitCpu` puts it back.
    async fn restart(&self, id: &str, task: &str, limit: Option<i64>) -> runtime::Result<()> {
        let wide = runtime::whole_node_nano_cpus();
        let Some(limit) = limit.filter(|l| *l < wide) else {
            return self.runtime.start(id).await;
        };
        if let Err(e) = self.runtime.limit_cpu(id, wide).await {
            debug!(task = %task, container = %id, error = %error_chain(&e), "cannot widen the CPU limit for the restart");
            return self.runtime.start(id).await;
        }
        let started = self.runtime.start(id).await;
        if let Err(e) = self.runtime.limit_cpu(id, limit).await {
            warn!(task = %task, container = %id, error = %error_chain(&e), "cannot put the CPU limit back after the restart");
        }
        started
    }

    /// Tells the history which desired tasks this node refuses to start: those with a
    /// volume that breaks the node's host path rules (see [`crate::host_paths`]). Checked
    /// every round, as links on the node can change; only tasks with volumes read the
    /// file system, a few `stat`s each.
    fn check_host_paths(&mut self, desired: &[Assignment]) {
        for a in desired {
            let why = self
                .runtime
                .host_paths()
                .check_volumes(&a.spec.volumes)
                .err()
                .map(|refused| refused.to_string());
            let reason = why.clone();
            if self.tracker.refuse(&a.task, why) {
                match reason {
                    Some(reason) => {
                        warn!(task = %a.task, %reason, "task refused: a volume breaks this node's host path rules")
                    }
                    None => info!(task = %a.task, "task's volumes are allowed now"),
                }
            }
        }
    }

    /// Keeps one prober per probed running container run: starts missing ones, aborts
    /// those whose container stopped, went or restarted.
    fn sync_probers(&mut self, desired: &[Assignment], observed: &[Observed]) {
        let targets = probe_targets(desired, observed);
        self.probers.retain(|task, p| {
            targets
                .iter()
                .any(|(a, run)| a.task == *task && *run == p.run)
        });
        for (a, run) in targets {
            if self.probers.contains_key(&a.task) {
                continue;
            }
            debug!(task = %a.task, container = %run.container, "probing");
            let handle = tokio::spawn(probe::watch(
                self.runtime.clone(),
                a.task.clone(),
                run.clone(),
                a.spec.probes.clone(),
                self.probe_tx.clone(),
            ));
            self.probers.insert(
                a.task.clone(),
                Prober {
                    run,
                    _task: AbortOnDrop(handle),
                },
            );
        }
    }

    async fn stop_and_remove(&self, id: &str) -> runtime::Result<()> {
        match self.runtime.stop(id, STOP_GRACE).await {
            Ok(()) | Err(runtime::Error::NotFound { .. }) => {}
            // Removal is forced anyway; a failed stop only costs the grace period.
            Err(e) => {
                warn!(container = %id, error = %error_chain(&e), "stop failed; removing by force")
            }
        }
        self.runtime.remove(id).await
    }

    /// Sends a status unless it equals the last one sent for the task. The final status
    /// of a Job's or CronJob's run (`completing`) carries the run's output, read once
    /// here: the statuses kept for comparison never hold output, so an unchanged final
    /// status is not sent (nor read) again.
    async fn report(&self, status: &TaskStatus, completing: bool) {
        {
            let mut sent = lock(&self.sent);
            if sent.get(&status.task) == Some(status) {
                return;
            }
            sent.insert(status.task.clone(), status.clone());
        }
        info!(task = %status.task, phase = %status.phase, exit_code = ?status.exit_code, message = ?status.message, "task status");
        let mut status = status.clone();
        if completing && is_finished(status.phase) {
            if let Some(id) = &status.container_id {
                status.output = read_output(&self.runtime, &status.task, id).await;
            }
        }
        self.send(AgentMessage::Status { status }).await;
    }

    async fn report_removed(&self, task: &str) {
        lock(&self.sent).remove(task);
        info!(task = %task, "task removed");
        self.send(AgentMessage::Removed {
            task: task.to_string(),
        })
        .await;
    }

    async fn send(&self, msg: AgentMessage) {
        if self.out.send(msg).await.is_err() {
            // The link owns the receiver; without it there is no one to tell. The
            // next Hello carries the current state.
            debug!("report channel closed; report dropped");
        }
    }
}

/// Whether a run-to-completion task's phase ends its run (its output is final).
fn is_finished(phase: TaskPhase) -> bool {
    matches!(phase, TaskPhase::Succeeded | TaskPhase::Failed)
}

/// The last [`MAX_OUTPUT_BYTES`] of a finished run's output; None (logged) if the logs
/// cannot be read, which must not hold up the status itself.
async fn read_output<R: Engine>(runtime: &R, task: &str, container: &str) -> Option<String> {
    match runtime.output(container, MAX_OUTPUT_BYTES).await {
        Ok(text) => Some(text),
        Err(e) => {
            warn!(task = %task, container = %container, error = %error_chain(&e), "cannot read the output of a finished run");
            None
        }
    }
}

async fn next_event(events: &mut Option<Events>) -> Option<runtime::Result<RuntimeEvent>> {
    match events {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
}

/// Swallows events that are already waiting: one round covers them all.
fn drain_ready(events: &mut Option<Events>) {
    if let Some(s) = events {
        while let Some(Some(Ok(_))) = s.next().now_or_never() {}
    }
}

async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The shell's own decisions, against an in-memory engine: which Wallet starts the gate
/// lets through, what a fenced node stops, which containers are removed and reported
/// `Removed`, and what the Hello says about the containers found on the node.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::fake::{assignment, Call, Fake};
    use tokio::sync::oneshot;

    const NODE: &str = "pi-1";

    /// A supervisor over `fake`, and the receiving end of its reports.
    fn supervisor(fake: &Fake) -> (Supervisor<Fake>, mpsc::Receiver<AgentMessage>) {
        let (tx, rx) = mpsc::channel(1024);
        (Supervisor::new(fake.clone(), NODE.to_string(), tx), rx)
    }

    /// The desired state's channel, its value already seen by the supervisor.
    fn desired(tasks: &[Assignment], fenced: bool) -> watch::Receiver<Desired> {
        let (tx, rx) = watch::channel(Desired {
            tasks: Some(tasks.to_vec()),
            fenced,
        });
        // The round only reads the channel: without a sender it stays as it is.
        drop(tx);
        rx
    }

    /// The reports sent so far.
    fn sent(rx: &mut mpsc::Receiver<AgentMessage>) -> Vec<AgentMessage> {
        let mut out = Vec::new();
        while let Ok(m) = rx.try_recv() {
            out.push(m);
        }
        out
    }

    fn removed(msgs: &[AgentMessage]) -> Vec<&str> {
        msgs.iter()
            .filter_map(|m| match m {
                AgentMessage::Removed { task } => Some(task.as_str()),
                _ => None,
            })
            .collect()
    }

    fn last_status<'a>(msgs: &'a [AgentMessage], task: &str) -> Option<&'a TaskStatus> {
        msgs.iter().rev().find_map(|m| match m {
            AgentMessage::Status { status } if status.task == task => Some(status),
            _ => None,
        })
    }

    /// The calls that change containers (not lists or pulls).
    fn changes(fake: &Fake) -> Vec<Call> {
        fake.calls()
            .into_iter()
            .filter(|c| !matches!(c, Call::List | Call::ListKind(_) | Call::EnsureImage(_)))
            .collect()
    }

    /// A Wallet's three ways to start: no container (create), a created container
    /// (start), an exited one (restart); the service's container is created each time.
    fn wallet_starts() -> Vec<(&'static str, Fake)> {
        let w = assignment("ltc-0", Kind::Wallet);
        let long_ago = Utc::now() - chrono::Duration::hours(1);
        let created = Fake::new(NODE);
        created.put(&w, ContainerState::Created, long_ago, None);
        let exited = Fake::new(NODE);
        let ran = Some((1, chrono::Duration::seconds(30)));
        exited.put(&w, ContainerState::Exited, long_ago, ran);
        vec![
            ("create", Fake::new(NODE)),
            ("start", created),
            ("restart", exited),
        ]
    }

    /// Whether the wallet was created, started or restarted.
    fn started_wallet(fake: &Fake) -> bool {
        fake.calls()
            .iter()
            .any(|c| matches!(c, Call::Create(t) if t == "ltc-0") || matches!(c, Call::Start(_)))
    }

    #[tokio::test]
    async fn a_wallet_start_planned_before_a_fence_does_not_happen() {
        let tasks = [
            assignment("ltc-0", Kind::Wallet),
            assignment("web-0", Kind::Service),
        ];
        for (how, fake) in wallet_starts() {
            let (mut sup, _rx) = supervisor(&fake);
            // Planned unfenced; the fence fell before the start.
            let latest = desired(&tasks, true);
            sup.round(&tasks, false, &latest).await.expect("round");
            assert!(!started_wallet(&fake), "{how}: {:?}", fake.calls());
            assert_eq!(fake.created(), ["web-0"], "{how}: other tasks go on");
        }
    }

    #[tokio::test]
    async fn a_wallet_start_planned_before_a_newer_task_set_waits_for_the_next_round() {
        let tasks = [
            assignment("ltc-0", Kind::Wallet),
            assignment("web-0", Kind::Service),
        ];
        for (how, fake) in wallet_starts() {
            let (mut sup, _rx) = supervisor(&fake);
            let (tx, mut latest) = watch::channel(Desired {
                tasks: Some(tasks.to_vec()),
                fenced: false,
            });
            // A task set arrived after the round took its plan's inputs (the same set
            // here: any newer one may have moved the wallet away).
            tx.send_modify(|d| d.tasks = Some(tasks.to_vec()));
            sup.round(&tasks, false, &latest).await.expect("round");
            assert!(!started_wallet(&fake), "{how}: {:?}", fake.calls());
            assert_eq!(fake.created(), ["web-0"], "{how}");

            // The loop takes the newer set, and the next round starts the wallet.
            latest.borrow_and_update();
            sup.round(&tasks, false, &latest).await.expect("round");
            assert!(started_wallet(&fake), "{how}: {:?}", fake.calls());
        }
    }

    #[tokio::test]
    async fn a_wallet_start_waiting_at_the_gate_is_dropped_when_the_fence_falls_meanwhile() {
        let fake = Fake::new(NODE);
        let (mut sup, _rx) = supervisor(&fake);
        let tasks = [
            assignment("ltc-0", Kind::Wallet),
            assignment("web-0", Kind::Service),
        ];
        let (tx, latest) = watch::channel(Desired {
            tasks: Some(tasks.to_vec()),
            fenced: false,
        });
        // The fence sweeper is sweeping: it holds the gate.
        let gate = sup.gate.clone();
        let sweep = gate.hold().await;
        let image = Call::EnsureImage(tasks[0].spec.image.clone());
        let fence_then_release = async {
            // The wallet's image is pulled before the gate: the start waits there now.
            while !fake.calls().contains(&image) {
                tokio::task::yield_now().await;
            }
            tx.send_modify(|d| d.fenced = true);
            drop(sweep);
        };
        let both = async { tokio::join!(sup.round(&tasks, false, &latest), fence_then_release) };
        let (round, ()) = tokio::time::timeout(Duration::from_secs(10), both)
            .await
            .expect("the round ends once the gate is free");
        round.expect("round");
        assert_eq!(fake.created(), ["web-0"], "{:?}", fake.calls());
    }

    #[tokio::test]
    async fn a_fenced_round_removes_the_wallets_with_the_fence_grace_and_starts_none() {
        let fake = Fake::new(NODE);
        let ltc = assignment("ltc-0", Kind::Wallet);
        let btc = assignment("btc-0", Kind::Wallet);
        let web = assignment("web-0", Kind::Service);
        let ltc_id = fake.running(&ltc);
        let old_id = fake.running(&assignment("old-0", Kind::Wallet));
        let web_id = fake.running(&web);
        let (mut sup, mut rx) = supervisor(&fake);
        let tasks = [ltc.clone(), btc.clone(), web.clone()];

        sup.round(&tasks, true, &desired(&tasks, true))
            .await
            .expect("round");

        let mut changes = changes(&fake);
        changes.sort_by_key(|c| format!("{c:?}"));
        assert_eq!(
            changes,
            [
                Call::Terminate(ltc_id, fence::GRACE),
                Call::Terminate(old_id, fence::GRACE),
            ],
            "only the wallets are stopped, none is started or created"
        );
        assert!(fake.has(&web_id));
        assert!(
            !fake
                .calls()
                .iter()
                .any(|c| matches!(c, Call::EnsureImage(_))),
            "no image is even pulled: nothing is to start"
        );
        let msgs = sent(&mut rx);
        for wallet in ["ltc-0", "btc-0"] {
            let s = last_status(&msgs, wallet).expect("the wallet is reported");
            assert_eq!(s.phase, TaskPhase::Stopped, "{wallet}");
            assert_eq!(s.message.as_deref(), Some(super::super::FENCED_MESSAGE));
        }
        assert_eq!(
            removed(&msgs),
            ["old-0"],
            "an unassigned wallet is reported gone"
        );
        let web_status = last_status(&msgs, "web-0").expect("web-0 is reported");
        assert_eq!(web_status.phase, TaskPhase::Running);
    }

    #[tokio::test]
    async fn containers_of_unassigned_tasks_are_stopped_removed_and_reported_removed() {
        let fake = Fake::new(NODE);
        let web = assignment("web-0", Kind::Service);
        let old_id = fake.running(&assignment("old-0", Kind::Service));
        let job_id = fake.put(
            &assignment("job-0", Kind::Job),
            ContainerState::Exited,
            Utc::now() - chrono::Duration::hours(1),
            Some((0, chrono::Duration::seconds(5))),
        );
        let web_id = fake.running(&web);
        let (mut sup, mut rx) = supervisor(&fake);
        let tasks = [web];

        sup.round(&tasks, false, &desired(&tasks, false))
            .await
            .expect("round");

        assert_eq!(
            changes(&fake),
            [
                Call::Stop(job_id.clone(), STOP_GRACE),
                Call::Remove(job_id),
                Call::Stop(old_id.clone(), STOP_GRACE),
                Call::Remove(old_id),
            ],
            "unassigned containers go in task order; the assigned one stays"
        );
        let msgs = sent(&mut rx);
        assert_eq!(removed(&msgs), ["job-0", "old-0"]);
        let web = last_status(&msgs, "web-0").expect("web-0 is reported");
        assert_eq!(web.container_id.as_deref(), Some(web_id.as_str()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_container_that_ignores_sigterm_holds_up_only_what_shares_its_port_or_wallet() {
        let fake = Fake::new(NODE);
        let port = |mut a: Assignment, host: u16| {
            a.spec.ports.push(bramble_api::manifest::Port {
                container: 80,
                host: Some(host),
                protocol: Default::default(),
            });
            a
        };
        let stubborn = fake.running(&port(assignment("old-0", Kind::Service), 8080));
        fake.ignore_sigterm(&stubborn);
        let old_wallet = fake.running(&assignment("coin-0", Kind::Wallet));
        fake.ignore_sigterm(&old_wallet);
        let free = assignment("web-0", Kind::Service);
        let same_port = port(assignment("api-0", Kind::Service), 8080);
        let new_wallet = assignment("coin-1", Kind::Wallet);
        let (mut sup, mut rx) = supervisor(&fake);
        let tasks = [free.clone(), same_port.clone(), new_wallet.clone()];

        sup.round(&tasks, false, &desired(&tasks, false))
            .await
            .expect("round");

        let calls = changes(&fake);
        let at = |c: &Call| calls.iter().position(|x| x == c).expect("called");
        let created = |a: &Assignment| at(&Call::Create(a.task.clone()));
        let removed = |id: &str| at(&Call::Remove(id.to_string()));
        assert!(
            created(&free) < removed(&stubborn) && created(&free) < removed(&old_wallet),
            "an unrelated start does not wait for the stops' grace: {calls:?}"
        );
        assert!(
            removed(&stubborn) < created(&same_port),
            "the port is free before it is bound again: {calls:?}"
        );
        assert!(
            removed(&old_wallet) < created(&new_wallet),
            "a Wallet's old container is gone before its new one starts: {calls:?}"
        );
        let msgs = sent(&mut rx);
        let running = msgs
            .iter()
            .position(|m| matches!(m, AgentMessage::Status { status } if status.task == free.task && status.phase == TaskPhase::Running))
            .expect("the free task is reported Running");
        let gone = msgs
            .iter()
            .position(|m| matches!(m, AgentMessage::Removed { task } if task == "old-0"))
            .expect("the old task is reported removed");
        assert!(
            running < gone,
            "a started task is reported Running without waiting for the slow stop: {msgs:?}"
        );
    }

    #[tokio::test]
    async fn a_run_sent_ahead_of_its_slot_is_created_at_once_and_started_at_the_slot() {
        let fake = Fake::new(NODE);
        let slot = Utc::now() + chrono::Duration::milliseconds(800);
        let mut run = Assignment {
            not_before: Some(slot),
            ..assignment("tick-0", Kind::CronJob)
        };
        run.spec.resources.cpu = Some("100m".parse().expect("cpu"));
        run.spec_hash = run.spec.hash();
        let (sup, mut rx) = supervisor(&fake);
        let (tx, latest) = watch::channel(Desired {
            tasks: Some(vec![run]),
            fenced: false,
        });
        let (stop, stopped) = oneshot::channel::<()>();
        let supervising = tokio::spawn(sup.run(latest, async {
            let _ = stopped.await;
        }));
        let state = || fake.containers().first().map(|c| (c.state, c.started_at));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while state().is_none() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(Utc::now() < slot, "created at once, well ahead of the slot");
        assert_eq!(state(), Some((ContainerState::Created, None)));
        let waiting = last_status(&sent(&mut rx), "tick-0").cloned();
        assert_eq!(waiting.map(|s| s.phase), Some(TaskPhase::Starting));
        while state().is_some_and(|(s, _)| s == ContainerState::Created)
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let Some((ContainerState::Running, Some(started))) = state() else {
            panic!("not started: {:?}", fake.calls());
        };
        assert!(
            started >= slot,
            "started at {started}, before its slot {slot}"
        );
        // Created without its CPU limit, so that the start is not throttled; limited
        // right after it.
        let calls = fake.calls();
        let id = fake.containers()[0].id.clone();
        let at = calls.iter().position(|c| *c == Call::Start(id.clone()));
        let at = at.unwrap_or_else(|| panic!("no start: {calls:?}"));
        assert_eq!(calls.get(at + 1), Some(&Call::LimitCpu(id, 100_000_000)));
        assert_eq!(fake.containers()[0].nano_cpus, Some(100_000_000));
        let _ = stop.send(());
        supervising.await.expect("supervisor ends");
        drop(tx);
    }

    #[tokio::test]
    async fn an_unassigned_container_that_cannot_be_removed_is_reported_removed_only_once_gone() {
        let fake = Fake::new(NODE);
        let old_id = fake.running(&assignment("old-0", Kind::Service));
        fake.stuck(&old_id, true);
        let (mut sup, mut rx) = supervisor(&fake);
        let latest = desired(&[], false);

        sup.round(&[], false, &latest).await.expect("round");
        assert!(fake.has(&old_id));
        assert_eq!(removed(&sent(&mut rx)), Vec::<&str>::new());

        fake.stuck(&old_id, false);
        sup.round(&[], false, &latest).await.expect("round");
        assert!(!fake.has(&old_id));
        assert_eq!(removed(&sent(&mut rx)), ["old-0"]);
    }

    #[tokio::test]
    async fn a_task_that_never_got_a_container_is_reported_removed_once_unassigned() {
        let fake = Fake::new(NODE);
        let web = assignment("web-0", Kind::Service);
        fake.missing_image(&web.spec.image);
        let (mut sup, mut rx) = supervisor(&fake);
        let tasks = [web];

        sup.round(&tasks, false, &desired(&tasks, false))
            .await
            .expect("round");
        assert!(fake.containers().is_empty());
        let msgs = sent(&mut rx);
        assert!(
            last_status(&msgs, "web-0").is_some(),
            "reported while it tries"
        );

        let latest = desired(&[], false);
        sup.round(&[], false, &latest).await.expect("round");
        assert_eq!(removed(&sent(&mut rx)), ["web-0"]);
        sup.round(&[], false, &latest).await.expect("round");
        assert_eq!(removed(&sent(&mut rx)), Vec::<&str>::new(), "once");
    }

    #[tokio::test]
    async fn running_containers_are_adopted_not_copied() {
        let fake = Fake::new(NODE);
        let web = assignment("web-0", Kind::Service);
        let ltc = assignment("ltc-0", Kind::Wallet);
        let web_id = fake.running(&web);
        let ltc_id = fake.running(&ltc);
        // A new supervisor: the agent restarted.
        let (mut sup, mut rx) = supervisor(&fake);
        let tasks = [web, ltc];
        let latest = desired(&tasks, false);

        sup.round(&tasks, false, &latest).await.expect("round");
        assert_eq!(changes(&fake), [], "nothing created, started or removed");
        let msgs = sent(&mut rx);
        for (task, id) in [("web-0", &web_id), ("ltc-0", &ltc_id)] {
            let s = last_status(&msgs, task).expect("reported");
            assert_eq!(s.phase, TaskPhase::Running, "{task}");
            assert_eq!(s.container_id.as_deref(), Some(id.as_str()), "{task}");
        }

        sup.round(&tasks, false, &latest).await.expect("round");
        assert_eq!(changes(&fake), []);
        assert!(
            sent(&mut rx).is_empty(),
            "an unchanged status is not sent again"
        );
    }

    #[tokio::test]
    async fn the_hello_reports_the_containers_found_on_the_node() {
        let fake = Fake::new(NODE);
        let hour_ago = Utc::now() - chrono::Duration::hours(1);
        let web_id = fake.running(&assignment("web-0", Kind::Service));
        let job_id = fake.put(
            &assignment("job-0", Kind::Job),
            ContainerState::Exited,
            hour_ago,
            Some((0, chrono::Duration::seconds(5))),
        );
        fake.output_of(&job_id, "paid 3 miners\n");
        let crash = assignment("crash-0", Kind::Service);
        let crash_id = fake.put(
            &crash,
            ContainerState::Exited,
            hour_ago,
            Some((2, chrono::Duration::seconds(5))),
        );
        fake.output_of(&crash_id, "not a job: no output in the hello\n");
        // Two containers of one task: the running one is the task's.
        let dup = assignment("dup-0", Kind::Service);
        fake.put(
            &dup,
            ContainerState::Exited,
            hour_ago,
            Some((1, chrono::Duration::seconds(5))),
        );
        let dup_id = fake.running(&dup);
        let (sup, _rx) = supervisor(&fake);

        let hello = sup.observe().await.expect("observe");

        let got: Vec<(&str, TaskPhase, Option<&str>)> = hello
            .iter()
            .map(|s| (s.task.as_str(), s.phase, s.container_id.as_deref()))
            .collect();
        assert_eq!(
            got,
            [
                ("crash-0", TaskPhase::Failed, Some(crash_id.as_str())),
                ("dup-0", TaskPhase::Running, Some(dup_id.as_str())),
                ("job-0", TaskPhase::Succeeded, Some(job_id.as_str())),
                ("web-0", TaskPhase::Running, Some(web_id.as_str())),
            ]
        );
        assert_eq!(hello[0].message.as_deref(), Some("exited with code 2"));
        assert_eq!(hello[0].output, None);
        assert_eq!(hello[2].output.as_deref(), Some("paid 3 miners\n"));
        assert_eq!(changes(&fake), [], "observing changes nothing");
    }

    #[tokio::test]
    async fn the_hello_carries_the_last_status_of_a_task_without_a_container() {
        let fake = Fake::new(NODE);
        let web = assignment("web-0", Kind::Service);
        fake.missing_image(&web.spec.image);
        let (mut sup, _rx) = supervisor(&fake);
        let tasks = [web];
        let latest = desired(&tasks, false);
        // Twice: the first attempt's failure is reported by the next round.
        sup.round(&tasks, false, &latest).await.expect("round");
        sup.round(&tasks, false, &latest).await.expect("round");

        let hello = sup.observe().await.expect("observe");

        assert_eq!(hello.len(), 1);
        assert_eq!(hello[0].task, "web-0");
        assert_eq!(hello[0].container_id, None);
        let message = hello[0].message.as_deref().unwrap_or_default();
        assert!(message.contains("pull failed"), "{message}");
    }

    fn with_volume(mut a: Assignment, host_path: &str) -> Assignment {
        a.spec.volumes.push(bramble_api::manifest::Volume {
            name: None,
            host_path: host_path.into(),
            path: "/data".into(),
            read_only: false,
        });
        a.spec_hash = a.spec.hash();
        a
    }

    #[tokio::test]
    async fn a_task_with_a_refused_host_path_is_reported_given_up_and_nothing_is_pulled_or_made() {
        let fake = Fake::new(NODE);
        let root = with_volume(assignment("root-0", Kind::Service), "/");
        let sock = with_volume(assignment("sock-0", Kind::Wallet), "/var/run/docker.sock");
        let ok = with_volume(
            assignment("ok-0", Kind::Service),
            "/var/lib/bramble/volumes/ok",
        );
        let (mut sup, mut rx) = supervisor(&fake);
        let tasks = [root, sock, ok];
        let latest = desired(&tasks, false);

        sup.round(&tasks, false, &latest).await.expect("round");
        sup.round(&tasks, false, &latest).await.expect("round");

        assert_eq!(fake.created(), ["ok-0"], "{:?}", fake.calls());
        let pulls: Vec<Call> = fake
            .calls()
            .into_iter()
            .filter(|c| matches!(c, Call::EnsureImage(_)))
            .collect();
        assert_eq!(pulls.len(), 1, "only the allowed task's image: {pulls:?}");
        let msgs = sent(&mut rx);
        for (task, message) in [
            (
                "root-0",
                "hostPath \"/\" is refused: a system path; allowed: /var/lib/bramble/volumes",
            ),
            (
                "sock-0",
                "hostPath \"/var/run/docker.sock\" is refused: under the system path /var/run; allowed: /var/lib/bramble/volumes",
            ),
        ] {
            let s = last_status(&msgs, task).expect("reported");
            assert_eq!(s.phase, TaskPhase::Failed, "{task}");
            assert!(s.gave_up, "{task}");
            assert_eq!(s.message.as_deref(), Some(message), "{task}");
        }
        let reports = msgs
            .iter()
            .filter(|m| matches!(m, AgentMessage::Status { status } if status.task == "root-0"))
            .count();
        assert_eq!(reports, 1, "an unchanged refusal is not sent again");
        let hello = sup.observe().await.expect("observe");
        assert!(
            hello.iter().any(|s| s.task == "root-0" && s.gave_up),
            "the hello says so too"
        );
    }

    #[tokio::test]
    async fn the_runtime_refuses_a_host_path_even_if_asked_directly() {
        let fake = Fake::new(NODE).with_host_paths(
            crate::host_paths::Policy::new(vec!["/srv/pool".into()]).expect("valid"),
        );
        let a = with_volume(assignment("w-0", Kind::Service), "/srv/pool-evil");
        let err = fake.create_and_start(&a).await.expect_err("refused");
        assert_eq!(
            error_chain(&err),
            "cannot create a container for task w-0: hostPath \"/srv/pool-evil\" is refused: not under an allowed prefix; allowed: /srv/pool"
        );
        assert!(
            fake.calls().is_empty(),
            "not even a pull: {:?}",
            fake.calls()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn before_the_first_task_set_only_a_fence_touches_the_nodes_containers() {
        let fake = Fake::new(NODE);
        let ltc_id = fake.running(&assignment("ltc-0", Kind::Wallet));
        let web_id = fake.running(&assignment("web-0", Kind::Service));
        let (sup, _rx) = supervisor(&fake);
        let (tx, rx) = watch::channel(Desired::default());
        let (stop, stopped) = oneshot::channel::<()>();
        let run = tokio::spawn(sup.run(rx, async {
            let _ = stopped.await;
        }));

        tokio::time::sleep(RESYNC_INTERVAL * 3).await;
        assert_eq!(fake.calls(), [], "no task set: the node keeps what it has");

        tx.send_modify(|d| d.fenced = true);
        tokio::time::sleep(fence::CHECK_EVERY).await;
        assert_eq!(changes(&fake), [Call::Terminate(ltc_id, fence::GRACE)]);
        assert!(fake.has(&web_id));

        let _ = stop.send(());
        run.await.expect("the supervisor stops");
    }

    #[tokio::test]
    async fn a_round_sets_the_cpu_limit_a_running_container_lacks_once() {
        let fake = Fake::new(NODE);
        let mut web = assignment("web-0", Kind::Service);
        web.spec.resources.cpu = Some("100m".parse().expect("cpu"));
        web.spec_hash = web.spec.hash();
        let id = fake.running(&web);
        // Its agent died between the start and the limit.
        fake.set_nano_cpus(&id, None);
        let (mut sup, _rx) = supervisor(&fake);
        let tasks = [web];
        let latest = desired(&tasks, false);
        sup.round(&tasks, false, &latest).await.expect("round");
        let limits = |fake: &Fake| {
            fake.calls()
                .into_iter()
                .filter(|c| matches!(c, Call::LimitCpu(..)))
                .collect::<Vec<_>>()
        };
        assert_eq!(limits(&fake), [Call::LimitCpu(id.clone(), 100_000_000)]);
        assert_eq!(fake.containers()[0].nano_cpus, Some(100_000_000));
        assert!(fake.has(&id), "the running container is kept");
        sup.round(&tasks, false, &latest).await.expect("round");
        assert_eq!(limits(&fake).len(), 1, "set once: {:?}", fake.calls());
    }

    #[tokio::test]
    async fn a_restart_runs_without_the_cpu_limit_only_for_its_start() {
        let fake = Fake::new(NODE);
        let mut web = assignment("web-0", Kind::Service);
        web.spec.resources.cpu = Some("10m".parse().expect("cpu"));
        web.spec_hash = web.spec.hash();
        // A first crash after a healthy run: restarted at once.
        let started = Utc::now() - chrono::Duration::minutes(10);
        let id = fake.put(
            &web,
            ContainerState::Exited,
            started,
            Some((1, chrono::Duration::minutes(5))),
        );
        let (mut sup, _rx) = supervisor(&fake);
        let tasks = [web];
        let latest = desired(&tasks, false);
        sup.round(&tasks, false, &latest).await.expect("round");
        let moves: Vec<Call> = fake
            .calls()
            .into_iter()
            .filter(|c| matches!(c, Call::LimitCpu(..) | Call::Start(_)))
            .collect();
        assert_eq!(
            moves,
            [
                Call::LimitCpu(id.clone(), runtime::whole_node_nano_cpus()),
                Call::Start(id.clone()),
                Call::LimitCpu(id.clone(), 10_000_000),
            ]
        );
        let c = &fake.containers()[0];
        assert_eq!(
            (c.state, c.nano_cpus),
            (ContainerState::Running, Some(10_000_000))
        );
    }
}
