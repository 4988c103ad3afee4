//! The pure decisions of CronJob and Job scheduling: which slot fires now and which
//! were missed, the unique key and task id of a firing, the concurrency policy, history
//! pruning, retries, and the operator's `cron run|suspend|resume`. Time is always an
//! argument.
//!
//! Exactly once: a slot's firing record (`/cronfirings/{job}/{slot}`, [`firing_key`])
//! is created "only if absent" in the same transaction as the run's task. A second
//! controller (or this one after a restart) trying the same slot fails on the key and
//! does nothing; a controller that crashed before the transaction left nothing, and the
//! slot fires on the next pass if it is still within its starting deadline.
//!
//! Ahead of time: a slot is fired [`LEAD`] before it, with the same record in the same
//! transaction, and its run starts at the slot (the agent waits for it). A job
//! suspended meanwhile stops such a run before it starts, and its record says Skipped.
//!
//! Slots are the instants of [`Schedule::next_after`]: whole seconds, with the
//! daylight-saving rule documented in [`bramble_api::schedule`].

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use bramble_api::backoff::Backoff;
use bramble_api::manifest::{ConcurrencyPolicy, Kind};
use bramble_api::rest::{CronJobView, Firing, FiringOutcome};
use bramble_api::schedule::Schedule;
use bramble_api::task::{DesiredState, Task, TaskPhase};
use chrono::{DateTime, SecondsFormat, TimeDelta, Utc};

use super::error::DomainError;
use super::events::Draft;
use super::model::{self, CronState, StoredWorkload, Versioned, FIRINGS};
use super::reconcile;
use super::snapshot::{Change, Expect, Item, Snapshot, Write};

/// How long before its slot a CronJob's run is decided, recorded and placed: its node
/// pulls the image and creates the container meanwhile, and starts it at the slot
/// ([`bramble_api::wire::Assignment::not_before`]), so a run's lateness is one
/// container start, not a store commit, a placement, a round trip and a create on top.
pub const LEAD: Duration = Duration::from_secs(2);

/// Firing records kept per job (the newest is what makes a slot fire once).
pub const KEEP_FIRINGS: usize = 100;

/// The wait before each retry of a failed run: 1 s, doubling, at most a minute.
pub const RETRY: Backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));

/// At most this many missed slots are listed in a [`Due`]. A Pi without a real-time
/// clock boots at 1970 and then jumps to today with NTP; a per-second schedule would
/// have 1.7 billion slots in between. Listing is capped so such a jump costs bounded
/// work (at most `MAX_MISSED + 2` schedule searches) and fires at most once.
pub const MAX_MISSED: usize = 1000;

/// What a CronJob should do now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Due {
    /// The one slot to fire now: the latest due slot, if it is within the starting
    /// deadline.
    pub fire: Option<DateTime<Utc>>,
    /// Due slots that will never fire, oldest first: every due slot but the latest,
    /// and the latest too when it is past the deadline. The most recent
    /// [`MAX_MISSED`] only; see `more_missed`.
    pub missed: Vec<DateTime<Utc>>,
    /// More slots were missed, before `missed[0]`, than are listed (they were not
    /// enumerated; see [`MAX_MISSED`]).
    pub more_missed: bool,
    /// The first slot after now (and after the last recorded slot): when to wake up.
    pub next: Option<DateTime<Utc>>,
}

impl Due {
    /// The slot to record as the job's last slot once `fire` and `missed` are stored,
    /// so the next call does not consider them again; `None` when nothing was due.
    pub fn last_slot(&self) -> Option<DateTime<Utc>> {
        self.fire.or_else(|| self.missed.last().copied())
    }
}

/// Decides which slots of `schedule` are due at `now`.
///
/// Due slots are those after `max(last_slot, created)` (exclusive: a recorded slot, or
/// one at the very instant of creation, never fires) up to `now` (inclusive). Of them
/// only the latest may fire, and only if `now - slot <= starting_deadline` (no deadline:
/// any lateness is fine). All others are missed: a controller that was down for an
/// hour fires one catch-up run, not a burst of twelve.
///
/// A clock that went back (`now` before `last_slot`) fires nothing until it passes
/// `last_slot` again, so a recorded slot never fires twice; `next` then is the first
/// slot after `last_slot`, which the shell should not sleep towards longer than its
/// resync period, as the clock may jump again.
pub fn due(
    schedule: &Schedule,
    last_slot: Option<DateTime<Utc>>,
    created: DateTime<Utc>,
    now: DateTime<Utc>,
    starting_deadline: Option<Duration>,
) -> Due {
    let start = last_slot.map_or(created, |l| l.max(created));
    let mut due = Due {
        fire: None,
        missed: Vec::new(),
        more_missed: false,
        next: schedule.next_after(now.max(start)),
    };
    let Some(latest) = schedule.latest_at_or_before(now).filter(|l| *l > start) else {
        return due;
    };

    // `latest <= now`, so the lateness is never negative.
    let late = (now - latest).to_std().unwrap_or_default();
    if starting_deadline.is_none_or(|d| late <= d) {
        due.fire = Some(latest);
    } else {
        due.missed.push(latest);
    }
    // Walk back from the latest slot, so a jump of years lists the recent slots.
    let mut cursor = latest;
    while let Some(slot) = latest_before(schedule, cursor).filter(|s| *s > start) {
        if due.missed.len() == MAX_MISSED {
            due.more_missed = true;
            break;
        }
        due.missed.push(slot);
        cursor = slot;
    }
    due.missed.reverse();
    due
}

/// The last slot strictly before `t`.
fn latest_before(schedule: &Schedule, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
    schedule.latest_at_or_before(t - TimeDelta::nanoseconds(1))
}

/// The store key recording that `job` fired (or missed) `slot`, e.g.
/// `/cronfirings/payout/2026-11-21T10:10:00Z`. Unique per slot: creating it only if
/// absent is what makes a firing happen once across controllers. Slots are whole
/// seconds, so the key keeps seconds and drops anything finer.
pub fn firing_key(job: &str, slot: DateTime<Utc>) -> String {
    format!(
        "{FIRINGS}{job}/{}",
        slot.to_rfc3339_opts(SecondsFormat::Secs, true)
    )
}

/// Longest DNS label.
const LABEL_MAX: usize = 63;
/// `-20261121t101000z`.
const SLOT_SUFFIX_LEN: usize = 17;

/// The id of the task that runs `job`'s firing at `slot`, e.g.
/// `payout-20261121t101000z`: deterministic, so two controllers derive the same id, and
/// a DNS label (at most 63 of `a-z0-9-`) when `job` is a valid workload name. A name too
/// long to fit is cut and followed by a hash of the whole name, so ids stay distinct.
pub fn task_id_for(job: &str, slot: DateTime<Utc>) -> String {
    let stamp = slot.format("%Y%m%dt%H%M%Sz");
    if job.len() + SLOT_SUFFIX_LEN <= LABEL_MAX {
        return format!("{job}-{stamp}");
    }
    // Room for the name's start, "-", 8 hex digits of hash and the slot suffix.
    let keep = LABEL_MAX - SLOT_SUFFIX_LEN - 9;
    let cut = job
        .char_indices()
        .take_while(|(i, c)| i + c.len_utf8() <= keep)
        .last()
        .map_or(0, |(i, c)| i + c.len_utf8());
    let hash = fnv1a(job.as_bytes()) >> 32;
    format!("{}-{hash:08x}-{stamp}", &job[..cut])
}

/// FNV-1a, 64 bits: stable across Rust releases and machines, unlike `DefaultHasher`.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// What to do with a slot that fires, given the runs still active.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Concurrency {
    /// Start the run.
    Fire,
    /// Do not start it; record the slot as skipped.
    Skip,
    /// Stop the active runs, then start this one.
    ReplaceThenFire,
}

/// Applies the job's concurrency policy: `Allow` always fires; `Forbid` skips and
/// `Replace` replaces while a run is active.
pub fn concurrency(policy: ConcurrencyPolicy, active_runs: usize) -> Concurrency {
    match policy {
        _ if active_runs == 0 => Concurrency::Fire,
        ConcurrencyPolicy::Allow => Concurrency::Fire,
        ConcurrencyPolicy::Forbid => Concurrency::Skip,
        ConcurrencyPolicy::Replace => Concurrency::ReplaceThenFire,
    }
}

/// The finished runs to delete, oldest first: those beyond the newest `keep_ok`
/// successful and the newest `keep_failed` failed ones. `runs` are (task id, slot,
/// succeeded) of finished runs only; a run still active is never pruned.
pub fn prune_history(
    runs: &[(String, DateTime<Utc>, bool)],
    keep_ok: u32,
    keep_failed: u32,
) -> Vec<String> {
    let mut newest_first: Vec<&(String, DateTime<Utc>, bool)> = runs.iter().collect();
    // Ties on the slot (retries of one firing) are broken by id, so the answer does
    // not depend on the order the store listed them in.
    newest_first.sort_by(|a, b| (b.1, &b.0).cmp(&(a.1, &a.0)));
    let (mut ok, mut failed) = (0u32, 0u32);
    let mut delete = Vec::new();
    for (id, _, succeeded) in newest_first {
        let (kept, limit) = if *succeeded {
            (&mut ok, keep_ok)
        } else {
            (&mut failed, keep_failed)
        };
        if *kept < limit {
            *kept += 1;
        } else {
            delete.push(id.clone());
        }
    }
    delete.reverse();
    delete
}

/// Whether a run that failed after `attempts_so_far` attempts (the first run counts as
/// one) is tried again: a job with `retries: n` runs at most `1 + n` times; no
/// `retries` means no retry.
pub fn should_retry(attempts_so_far: u32, retries: Option<u32>) -> bool {
    attempts_so_far <= retries.unwrap_or(0)
}

/// A new run of a workload: a pending task like a replica's, with its slot and attempt.
pub fn run_task(
    w: &StoredWorkload,
    id: String,
    slot: Option<DateTime<Utc>>,
    attempt: u32,
    now: DateTime<Utc>,
) -> Task {
    Task {
        slot,
        attempt,
        ..reconcile::new_task(w, id, 0, now)
    }
}

/// Whether a run is still going (counts for the concurrency policy).
fn active(t: &Task) -> bool {
    t.desired == DesiredState::Running && !t.phase.is_terminal()
}

/// The id of retry `attempt` of the run whose first attempt is `base`.
fn retry_id(base: &str, attempt: u32) -> String {
    format!("{base}-r{attempt}")
}

fn base_id(t: &Task) -> &str {
    match t.id.rsplit_once("-r") {
        Some((b, n)) if t.attempt > 0 && n.parse::<u32>().is_ok() => b,
        _ => &t.id,
    }
}

/// One pass over every CronJob and Job: fire due slots, record missed ones, retry
/// failed runs, prune history. Returns one change per job (so a conflict on one job
/// does not hold up the others) and the earliest time something is due next.
pub fn pass(snap: &Snapshot, now: DateTime<Utc>) -> (Vec<Change>, Option<DateTime<Utc>>) {
    let mut next: Option<DateTime<Utc>> = None;
    let mut soonest = |t: Option<DateTime<Utc>>| {
        if let Some(t) = t {
            next = Some(next.map_or(t, |n: DateTime<Utc>| n.min(t)));
        }
    };
    let mut changes = Vec::new();
    // Every run of every CronJob and Job, found in one look at the tasks: this pass
    // runs every second, and a scan of all tasks per workload made it cost workloads ×
    // tasks (10^7 string compares a second with a thousand Services of ten replicas).
    let mut runs_of: BTreeMap<(Kind, &str), Vec<&Versioned<Task>>> = BTreeMap::new();
    if snap
        .workloads
        .keys()
        .any(|(kind, _)| matches!(kind, Kind::CronJob | Kind::Job))
    {
        for t in snap.tasks.values() {
            if matches!(t.value.kind, Kind::CronJob | Kind::Job) {
                runs_of
                    .entry((t.value.kind, t.value.workload.as_str()))
                    .or_default()
                    .push(t.as_ref());
            }
        }
    }
    for w in snap.workloads.values() {
        let w = &w.value;
        if !matches!(w.kind(), Kind::CronJob | Kind::Job) {
            continue;
        }
        let runs: &[&Versioned<Task>] = runs_of
            .get(&(w.kind(), w.name()))
            .map_or(&[], Vec::as_slice);
        let mut change = Change::default();
        match w.kind() {
            Kind::CronJob => {
                let (c, n) = fire(snap, w, runs, now);
                change.extend(c);
                soonest(n);
                let (c, n) = retry(w, runs, now);
                change.extend(c);
                soonest(n);
                change.extend(prune(w, runs));
            }
            Kind::Job => {
                let (c, n) = retry(w, runs, now);
                change.extend(c);
                soonest(n);
            }
            _ => {}
        }
        if !change.is_empty() {
            changes.push(change);
        }
    }
    (changes, next)
}

/// Fires a CronJob's due slot and records its missed ones; returns when it is due next.
fn fire(
    snap: &Snapshot,
    w: &StoredWorkload,
    runs: &[&Versioned<Task>],
    now: DateTime<Utc>,
) -> (Change, Option<DateTime<Utc>>) {
    let job = w.name();
    let spec = &w.manifest.spec;
    let Some(expr) = spec.schedule.as_deref() else {
        return (Change::default(), None);
    };
    let Ok(schedule) = Schedule::parse(expr, spec.timezone.as_deref()) else {
        // Validated at apply; a stored one that no longer parses is shown by its view
        // (no next slot) and never fired.
        return (Change::default(), None);
    };
    let state = snap.cron_state(job);
    if spec.suspend == Some(true) || state.suspended {
        return (Change::default(), None);
    }
    let firings = snap.firings_of(job);
    let last = firings
        .iter()
        .filter(|f| f.value.outcome != FiringOutcome::Manual)
        .map(|f| f.value.slot)
        .max();
    let created = state
        .resumed_at
        .map_or(w.created_at, |r| r.max(w.created_at));
    let due = due(
        &schedule,
        last,
        created,
        now,
        spec.starting_deadline.map(|d| d.std()),
    );

    let mut change = Change::default();
    let obj = format!("cronjob/{job}");
    let record = |slot: DateTime<Utc>, outcome, task: Option<String>| Write {
        key: firing_key(job, slot),
        expect: Expect::Absent,
        value: Some(Item::Firing(Firing {
            slot,
            outcome,
            task,
            decided_at: now,
        })),
    };
    // The slot's run and its record, in one change: what makes it fire once.
    let fire_run = |change: &mut Change, slot: DateTime<Utc>, when: &str| {
        let id = task_id_for(job, slot);
        change
            .writes
            .push(Write::task(run_task(w, id.clone(), Some(slot), 0, now), 0));
        change
            .writes
            .push(record(slot, FiringOutcome::Fired, Some(id.clone())));
        change.drafts.push(Draft::normal(
            &obj,
            "Fired",
            format!("slot {slot} → task {id} ({when})"),
        ));
    };
    for slot in &due.missed {
        change
            .writes
            .push(record(*slot, FiringOutcome::Missed, None));
    }
    if let Some(latest) = due.missed.last() {
        let more = if due.more_missed {
            " (and older ones)"
        } else {
            ""
        };
        change.drafts.push(Draft::warning(
            &obj,
            "Missed",
            format!(
                "{} slots missed beyond the starting deadline{more}; latest {latest}",
                due.missed.len()
            ),
        ));
    }
    if let Some(slot) = due.fire {
        let running: Vec<&&Versioned<Task>> = runs.iter().filter(|t| active(&t.value)).collect();
        let policy = spec.concurrency_policy.unwrap_or_default();
        match concurrency(policy, running.len()) {
            Concurrency::Skip => {
                change
                    .writes
                    .push(record(slot, FiringOutcome::Skipped, None));
                change.drafts.push(Draft::warning(
                    &obj,
                    "Skipped",
                    format!("slot {slot}: the previous run is still active (Forbid)"),
                ));
            }
            c @ (Concurrency::Fire | Concurrency::ReplaceThenFire) => {
                if c == Concurrency::ReplaceThenFire {
                    for t in &running {
                        let mut stopped = t.value.clone();
                        stopped.desired = DesiredState::Stopped;
                        stopped.message = Some(format!("replaced by the run for {slot}"));
                        change.writes.push(Write::task(stopped, t.rev));
                    }
                }
                let late = (now - slot).num_milliseconds();
                fire_run(&mut change, slot, &format!("{late} ms after the slot"));
            }
        }
    }
    let mut next = due.next;
    if let (None, Some(slot)) = (due.fire, due.next) {
        let lead = TimeDelta::from_std(LEAD).unwrap_or_default();
        if slot - lead <= now {
            // Decided ahead only when the concurrency policy cannot change its mind by
            // the slot: with Forbid or Replace and a run still going, the slot is
            // decided at the slot, as it always was.
            let policy = spec.concurrency_policy.unwrap_or_default();
            let active = runs.iter().filter(|t| active(&t.value)).count();
            if policy == ConcurrencyPolicy::Allow || active == 0 {
                let ahead = (slot - now).num_milliseconds();
                fire_run(
                    &mut change,
                    slot,
                    &format!("{ahead} ms ahead; it starts at the slot"),
                );
                // The commit wakes the loop, which then looks for the slot after it.
                next = None;
            }
        } else {
            next = Some(slot - lead);
        }
    }
    // Old records go, never the newest (it is what keeps a slot from firing twice).
    if firings.len() > KEEP_FIRINGS + 20 {
        for f in firings.iter().take(firings.len() - KEEP_FIRINGS) {
            change.writes.push(Write {
                key: firing_key(job, f.value.slot),
                expect: Expect::Any,
                value: None,
            });
        }
    }
    (change, next)
}

/// Failed runs with retries left get a new attempt after a back-off ([`RETRY`]).
fn retry(
    w: &StoredWorkload,
    runs: &[&Versioned<Task>],
    now: DateTime<Utc>,
) -> (Change, Option<DateTime<Utc>>) {
    let retries = w.manifest.spec.retries;
    let mut next = None;
    let mut change = Change::default();
    // The newest attempt of each run decides.
    let mut newest: HashMap<&str, &Task> = HashMap::new();
    for t in runs.iter().map(|v| &v.value) {
        let e = newest.entry(base_id(t)).or_insert(t);
        if t.attempt > e.attempt {
            *e = t;
        }
    }
    let mut newest: Vec<(&str, &Task)> = newest.into_iter().collect();
    newest.sort_by_key(|(b, _)| *b);
    for (base, t) in newest {
        if t.phase != TaskPhase::Failed
            || t.desired != DesiredState::Running
            || t.spec_hash != w.spec_hash
        {
            continue;
        }
        if !should_retry(t.attempt + 1, retries) {
            continue;
        }
        let attempt = t.attempt + 1;
        let at = t.finished_at.unwrap_or(t.created_at)
            + chrono::Duration::from_std(RETRY.delay(attempt)).unwrap_or_default();
        if at > now {
            next = Some(next.map_or(at, |n: DateTime<Utc>| n.min(at)));
            continue;
        }
        let id = retry_id(base, attempt);
        let mut task = run_task(w, id.clone(), t.slot, attempt, now);
        // A node that could not run it is avoided, as for replicas.
        task.avoid = t.avoid.clone();
        change.writes.push(Write::task(task, 0));
        change.drafts.push(Draft::warning(
            format!("task/{}", t.id),
            "Retrying",
            format!(
                "attempt {} of {} as task {id}",
                attempt + 1,
                retries.unwrap_or(0) + 1
            ),
        ));
    }
    (change, next)
}

/// Finished runs beyond the history limits are stopped (their containers go, then
/// their records).
fn prune(w: &StoredWorkload, runs: &[&Versioned<Task>]) -> Change {
    let history = w.manifest.spec.history.unwrap_or_default();
    let finished: Vec<(String, DateTime<Utc>, bool)> = runs
        .iter()
        .filter(|t| t.value.desired == DesiredState::Running && t.value.phase.is_terminal())
        .map(|t| {
            (
                t.value.id.clone(),
                t.value.slot.unwrap_or(t.value.created_at),
                t.value.phase == TaskPhase::Succeeded,
            )
        })
        .collect();
    let mut change = Change::default();
    for id in prune_history(&finished, history.successful, history.failed) {
        let Some(t) = runs.iter().find(|t| t.value.id == id) else {
            continue;
        };
        let mut next = t.value.clone();
        next.desired = DesiredState::Stopped;
        next.message = Some("pruned by the history limit".into());
        change.writes.push(Write::task(next, t.rev));
    }
    change
}

/// Every CronJob with its recent slots.
pub fn views(snap: &Snapshot, now: DateTime<Utc>) -> Vec<CronJobView> {
    snap.workloads
        .values()
        .filter(|w| w.value.kind() == Kind::CronJob)
        .map(|w| view(snap, &w.value, now))
        .collect()
}

/// One CronJob.
pub fn job(snap: &Snapshot, name: &str, now: DateTime<Utc>) -> Result<CronJobView, DomainError> {
    let w = snap
        .workload(Kind::CronJob, name)
        .ok_or_else(|| DomainError::not_found("cronjob", name))?;
    Ok(view(snap, &w.value, now))
}

fn view(snap: &Snapshot, w: &StoredWorkload, now: DateTime<Utc>) -> CronJobView {
    let name = w.name();
    let spec = &w.manifest.spec;
    let state = snap.cron_state(name);
    let suspended = spec.suspend == Some(true) || state.suspended;
    let mut firings: Vec<Firing> = snap
        .firings_of(name)
        .into_iter()
        .map(|v| v.value.clone())
        .collect();
    firings.sort_by_key(|f| std::cmp::Reverse(f.slot));
    let runs: Vec<&Task> = snap
        .tasks_of(Kind::CronJob, name)
        .map(|t| &t.value)
        .collect();
    let newest = runs.iter().max_by_key(|t| (t.slot, t.attempt));
    let schedule = spec
        .schedule
        .as_deref()
        .and_then(|e| Schedule::parse(e, spec.timezone.as_deref()).ok());
    CronJobView {
        name: name.to_string(),
        schedule: spec.schedule.clone().unwrap_or_default(),
        timezone: spec.timezone.clone().unwrap_or_else(|| "UTC".into()),
        suspended,
        last_slot: firings
            .iter()
            .find(|f| f.outcome != FiringOutcome::Manual)
            .map(|f| f.slot),
        last_result: newest.map(|t| t.phase),
        next: if suspended {
            None
        } else {
            schedule.and_then(|s| s.next_after(now))
        },
        active: u32::try_from(runs.iter().filter(|t| active(t)).count()).unwrap_or(u32::MAX),
        firings: firings.into_iter().take(20).collect(),
    }
}

/// Starts a run now, whatever the schedule (`bramblectl cron run`). Manual runs are
/// keyed by the current second, so a double click runs once.
pub fn run_now(
    snap: &Snapshot,
    name: &str,
    now: DateTime<Utc>,
) -> Result<(Change, Task), DomainError> {
    let w = snap
        .workload(Kind::CronJob, name)
        .ok_or_else(|| DomainError::not_found("cronjob", name))?;
    let slot = DateTime::from_timestamp(now.timestamp(), 0).unwrap_or(now);
    let id = format!("{}-manual", task_id_for(name, slot));
    let key = format!(
        "{}manual-{}",
        model::firings_prefix(name),
        slot.to_rfc3339_opts(SecondsFormat::Secs, true)
    );
    if snap.firings.contains_key(&key) || snap.task(&id).is_some() {
        return Err(DomainError::Conflict(format!(
            "cronjob {name:?} was already started by hand this second"
        )));
    }
    let task = run_task(&w.value, id.clone(), Some(slot), 0, now);
    let change = Change::new(
        vec![
            Write {
                key,
                expect: Expect::Absent,
                value: Some(Item::Firing(Firing {
                    slot,
                    outcome: FiringOutcome::Manual,
                    task: Some(id.clone()),
                    decided_at: now,
                })),
            },
            Write::task(task.clone(), 0),
        ],
        vec![Draft::normal(
            format!("cronjob/{name}"),
            "Fired",
            format!("started by hand as task {id}"),
        )],
    );
    Ok((change, task))
}

/// Suspends or resumes a CronJob without touching its manifest; an empty change when
/// it already is.
pub fn suspend(
    snap: &Snapshot,
    name: &str,
    suspended: bool,
    now: DateTime<Utc>,
) -> Result<Change, DomainError> {
    snap.workload(Kind::CronJob, name)
        .ok_or_else(|| DomainError::not_found("cronjob", name))?;
    let cur = snap.cron_state.get(name);
    let (mut state, rev) = cur.map_or((CronState::default(), 0), |v| (v.value.clone(), v.rev));
    if state.suspended == suspended {
        return Ok(Change::default());
    }
    state.suspended = suspended;
    if !suspended {
        state.resumed_at = Some(now);
    }
    let reason = if suspended { "Suspended" } else { "Resumed" };
    let mut writes = vec![Write {
        key: model::cron_state_key(name),
        expect: Expect::of(rev),
        value: Some(Item::CronState(state)),
    }];
    if suspended {
        writes.extend(unfire_ahead(snap, name, now));
    }
    Ok(Change::new(
        writes,
        vec![Draft::normal(
            format!("cronjob/{name}"),
            reason,
            "by the operator",
        )],
    ))
}

/// The runs of `job` fired ahead of a slot still to come, stopped before they start,
/// and their slots' records changed to Skipped (kept: the slot must not fire again).
fn unfire_ahead(snap: &Snapshot, job: &str, now: DateTime<Utc>) -> Vec<Write> {
    let mut writes = Vec::new();
    for f in snap.firings_of(job) {
        let Some(id) = f.value.task.as_deref() else {
            continue;
        };
        if f.value.outcome != FiringOutcome::Fired || f.value.slot <= now {
            continue;
        }
        let Some(t) = snap.task(id) else { continue };
        if t.value.desired != DesiredState::Running || t.value.started_at.is_some() {
            continue;
        }
        let mut stopped = t.value.clone();
        stopped.desired = DesiredState::Stopped;
        stopped.message = Some("suspended before its slot".into());
        writes.push(Write::task(stopped, t.rev));
        writes.push(Write {
            key: firing_key(job, f.value.slot),
            expect: Expect::of(f.rev),
            value: Some(Item::Firing(Firing {
                outcome: FiringOutcome::Skipped,
                task: None,
                decided_at: now,
                ..f.value.clone()
            })),
        });
    }
    writes
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s)
            .unwrap_or_else(|e| panic!("bad test time {s}: {e}"))
            .to_utc()
    }

    fn ats(s: &[&str]) -> Vec<DateTime<Utc>> {
        s.iter().map(|s| at(s)).collect()
    }

    fn sched(expr: &str, tz: &str) -> Schedule {
        Schedule::parse(expr, Some(tz)).unwrap_or_else(|e| panic!("{e}"))
    }

    const MIN: Duration = Duration::from_secs(60);

    #[test]
    fn due_with_a_fake_clock() {
        struct Case {
            name: &'static str,
            last: Option<&'static str>,
            now: &'static str,
            deadline: Option<Duration>,
            fire: Option<&'static str>,
            missed: &'static [&'static str],
            next: &'static str,
        }
        let s = sched("*/10 * * * *", "UTC");
        let created = at("2026-11-21T09:03:00Z");
        let cases = [
            Case {
                name: "on time",
                last: Some("2026-11-21T10:00:00Z"),
                now: "2026-11-21T10:10:00.050Z",
                deadline: Some(MIN),
                fire: Some("2026-11-21T10:10:00Z"),
                missed: &[],
                next: "2026-11-21T10:20:00Z",
            },
            Case {
                name: "exactly on the slot",
                last: Some("2026-11-21T10:00:00Z"),
                now: "2026-11-21T10:10:00Z",
                deadline: Some(MIN),
                fire: Some("2026-11-21T10:10:00Z"),
                missed: &[],
                next: "2026-11-21T10:20:00Z",
            },
            Case {
                name: "not yet",
                last: Some("2026-11-21T10:00:00Z"),
                now: "2026-11-21T10:09:59.999Z",
                deadline: Some(MIN),
                fire: None,
                missed: &[],
                next: "2026-11-21T10:10:00Z",
            },
            Case {
                name: "late within the deadline",
                last: Some("2026-11-21T10:00:00Z"),
                now: "2026-11-21T10:11:00Z",
                deadline: Some(MIN),
                fire: Some("2026-11-21T10:10:00Z"),
                missed: &[],
                next: "2026-11-21T10:20:00Z",
            },
            Case {
                name: "late beyond the deadline",
                last: Some("2026-11-21T10:00:00Z"),
                now: "2026-11-21T10:11:00.001Z",
                deadline: Some(MIN),
                fire: None,
                missed: &["2026-11-21T10:10:00Z"],
                next: "2026-11-21T10:20:00Z",
            },
            Case {
                name: "down for several slots: the latest fires",
                last: Some("2026-11-21T10:00:00Z"),
                now: "2026-11-21T10:40:30Z",
                deadline: Some(MIN),
                fire: Some("2026-11-21T10:40:00Z"),
                missed: &[
                    "2026-11-21T10:10:00Z",
                    "2026-11-21T10:20:00Z",
                    "2026-11-21T10:30:00Z",
                ],
                next: "2026-11-21T10:50:00Z",
            },
            Case {
                name: "down for several slots, the latest too late as well",
                last: Some("2026-11-21T10:00:00Z"),
                now: "2026-11-21T10:42:00Z",
                deadline: Some(MIN),
                fire: None,
                missed: &[
                    "2026-11-21T10:10:00Z",
                    "2026-11-21T10:20:00Z",
                    "2026-11-21T10:30:00Z",
                    "2026-11-21T10:40:00Z",
                ],
                next: "2026-11-21T10:50:00Z",
            },
            Case {
                name: "no deadline: only the latest fires, however late",
                last: Some("2026-11-21T10:00:00Z"),
                now: "2026-11-21T10:39:59Z",
                deadline: None,
                fire: Some("2026-11-21T10:30:00Z"),
                missed: &["2026-11-21T10:10:00Z", "2026-11-21T10:20:00Z"],
                next: "2026-11-21T10:40:00Z",
            },
            Case {
                name: "zero deadline: only an exact hit fires",
                last: Some("2026-11-21T10:00:00Z"),
                now: "2026-11-21T10:10:00.001Z",
                deadline: Some(Duration::ZERO),
                fire: None,
                missed: &["2026-11-21T10:10:00Z"],
                next: "2026-11-21T10:20:00Z",
            },
            Case {
                name: "first firing counts from creation",
                last: None,
                now: "2026-11-21T09:10:01Z",
                deadline: Some(MIN),
                fire: Some("2026-11-21T09:10:00Z"),
                missed: &[],
                next: "2026-11-21T09:20:00Z",
            },
            Case {
                name: "nothing before creation",
                last: None,
                now: "2026-11-21T09:05:00Z",
                deadline: None,
                fire: None,
                missed: &[],
                next: "2026-11-21T09:10:00Z",
            },
            Case {
                name: "the recorded slot does not fire again",
                last: Some("2026-11-21T10:10:00Z"),
                now: "2026-11-21T10:10:00Z",
                deadline: None,
                fire: None,
                missed: &[],
                next: "2026-11-21T10:20:00Z",
            },
            Case {
                name: "clock went back: nothing, wake after the recorded slot",
                last: Some("2026-11-21T10:10:00Z"),
                now: "2026-11-21T09:30:00Z",
                deadline: None,
                fire: None,
                missed: &[],
                next: "2026-11-21T10:20:00Z",
            },
            Case {
                name: "clock went back, then forward past the recorded slot",
                last: Some("2026-11-21T10:10:00Z"),
                now: "2026-11-21T10:20:05Z",
                deadline: Some(MIN),
                fire: Some("2026-11-21T10:20:00Z"),
                missed: &[],
                next: "2026-11-21T10:30:00Z",
            },
        ];
        for c in cases {
            let d = due(&s, c.last.map(at), created, at(c.now), c.deadline);
            let want = Due {
                fire: c.fire.map(at),
                missed: ats(c.missed),
                more_missed: false,
                next: Some(at(c.next)),
            };
            assert_eq!(d, want, "{}", c.name);
        }
    }

    #[test]
    fn a_clock_jump_of_years_lists_a_bounded_number_of_misses_and_fires_once() {
        // A Pi without a clock created the job at 1970, then NTP set the clock.
        let s = sched("* * * * * *", "UTC");
        let created = at("1970-01-01T00:00:10Z");
        let now = at("2026-11-21T10:10:00.500Z");
        let started = std::time::Instant::now();
        let d = due(&s, None, created, now, None);
        assert_eq!(d.fire, Some(at("2026-11-21T10:10:00Z")));
        assert_eq!(d.missed.len(), MAX_MISSED);
        assert!(d.more_missed);
        // The most recent misses are listed, oldest first, right before the firing.
        assert_eq!(d.missed.last(), Some(&at("2026-11-21T10:09:59Z")));
        assert_eq!(d.missed[0], at("2026-11-21T09:53:20Z"));
        assert_eq!(d.next, Some(at("2026-11-21T10:10:01Z")));
        // Bounded work: far below the 1.7 billion slots in between, even unoptimised.
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );

        // With a deadline, the stale latest slot is one of the misses.
        let d = due(&s, None, created, now, Some(Duration::from_millis(100)));
        assert_eq!(d.fire, None);
        assert_eq!(d.missed.len(), MAX_MISSED);
        assert_eq!(d.missed.last(), Some(&at("2026-11-21T10:10:00Z")));
        assert_eq!(d.last_slot(), Some(at("2026-11-21T10:10:00Z")));
    }

    #[test]
    fn exactly_max_missed_is_not_more() {
        let s = sched("* * * * * *", "UTC");
        let created = at("2026-11-21T10:00:00Z");
        // Slots 10:00:01 ..= 10:16:41: 1001 of them, the last fires.
        let d = due(&s, None, created, at("2026-11-21T10:16:41Z"), None);
        assert_eq!((d.missed.len(), d.more_missed), (MAX_MISSED, false));
        let d = due(&s, None, created, at("2026-11-21T10:16:42Z"), None);
        assert_eq!((d.missed.len(), d.more_missed), (MAX_MISSED, true));
    }

    /// Runs a controller loop on a fake clock that ticks every `step` seconds plus some
    /// jitter, recording the last slot as the shell would; returns every firing.
    fn simulate(
        s: &Schedule,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        step: i64,
    ) -> Vec<DateTime<Utc>> {
        let (mut now, created) = (from, from);
        let mut last = None;
        let mut fired = Vec::new();
        let mut tick = 0;
        while now < to {
            let d = due(s, last, created, now, Some(Duration::from_secs(300)));
            assert!(
                d.missed.is_empty(),
                "a loop that never stalls misses nothing: {d:?}"
            );
            fired.extend(d.fire);
            last = d.last_slot().or(last);
            // A real loop wakes a little late, by varying amounts.
            tick += 1;
            now += TimeDelta::seconds(step) + TimeDelta::milliseconds(tick % 7 * 13);
        }
        fired
    }

    #[test]
    fn a_loop_on_a_fake_clock_fires_every_wall_time_once_across_dst() {
        // (expression, zone, the local day, its firings: every wall time once, the
        // skipped ones folded into the first instant after the gap)
        let cases = [
            (
                "*/15 * * * *",
                "Europe/Stockholm",
                "2026-03-29T00:00:00+01:00",
                "2026-03-30T00:00:00+02:00",
                96 - 4,
            ),
            (
                "*/15 * * * *",
                "Europe/Stockholm",
                "2026-10-25T00:00:00+02:00",
                "2026-10-26T00:00:00+01:00",
                96,
            ),
            (
                "*/5 * * * * *",
                "Europe/Stockholm",
                "2026-10-25T00:00:00+02:00",
                "2026-10-26T00:00:00+01:00",
                24 * 720,
            ),
            (
                "30 2 * * *",
                "Europe/Stockholm",
                "2026-03-29T00:00:00+01:00",
                "2026-03-30T00:00:00+02:00",
                1,
            ),
            (
                "30 2 * * *",
                "Europe/Stockholm",
                "2026-10-25T00:00:00+02:00",
                "2026-10-26T00:00:00+01:00",
                1,
            ),
            (
                "0 * * * *",
                "America/New_York",
                "2026-03-08T00:00:00-05:00",
                "2026-03-09T00:00:00-04:00",
                24 - 1,
            ),
            (
                "0 * * * *",
                "America/New_York",
                "2026-11-01T00:00:00-04:00",
                "2026-11-02T00:00:00-05:00",
                24,
            ),
            (
                "30 1 * * *",
                "America/New_York",
                "2026-11-01T00:00:00-04:00",
                "2026-11-02T00:00:00-05:00",
                1,
            ),
        ];
        for (expr, tz, day, next_day, want) in cases {
            let s = sched(expr, tz);
            let (day, next_day) = (at(day), at(next_day));
            // Tick faster than the schedule, so nothing is ever missed.
            let step = if expr.split_whitespace().count() == 6 {
                2
            } else {
                61
            };
            let fired = simulate(
                &s,
                day - TimeDelta::hours(3),
                next_day + TimeDelta::hours(3),
                step,
            );
            let mut unique = fired.clone();
            unique.dedup();
            assert_eq!(unique, fired, "{expr} in {tz}: fired twice");
            let on_day = fired
                .iter()
                .filter(|f| **f >= day && **f < next_day)
                .count();
            assert_eq!(on_day, want, "{expr} in {tz} on {day}");
        }
    }

    #[test]
    fn firing_keys_and_task_ids() {
        let slot = at("2026-11-21T11:10:00+01:00");
        assert_eq!(
            firing_key("payout", slot),
            "/cronfirings/payout/2026-11-21T10:10:00Z"
        );
        assert_eq!(
            firing_key("payout", at("2026-11-21T10:10:00.999Z")),
            "/cronfirings/payout/2026-11-21T10:10:00Z"
        );
        assert_eq!(task_id_for("payout", slot), "payout-20261121t101000z");

        let fits = "a".repeat(LABEL_MAX - SLOT_SUFFIX_LEN);
        assert_eq!(task_id_for(&fits, slot), format!("{fits}-20261121t101000z"));
        // Long names are cut to fit a DNS label, and stay distinct by their hash.
        let (long_a, long_b) = (
            format!("{}a", "x".repeat(62)),
            format!("{}b", "x".repeat(62)),
        );
        let (a, b) = (task_id_for(&long_a, slot), task_id_for(&long_b, slot));
        assert_ne!(a, b);
        for id in [&a, &b] {
            assert!(id.len() <= LABEL_MAX, "{id}");
            assert!(id.ends_with("-20261121t101000z"), "{id}");
            assert!(id.parse::<bramble_api::manifest::Name>().is_ok(), "{id}");
        }
        // Deterministic: what another controller computes.
        assert_eq!(a, task_id_for(&long_a, slot));
    }

    #[test]
    fn concurrency_policies() {
        use Concurrency::*;
        use ConcurrencyPolicy::*;
        let cases = [
            (Allow, 0, Fire),
            (Allow, 2, Fire),
            (Forbid, 0, Fire),
            (Forbid, 1, Skip),
            (Replace, 0, Fire),
            (Replace, 1, ReplaceThenFire),
        ];
        for (policy, active, want) in cases {
            assert_eq!(
                concurrency(policy, active),
                want,
                "{policy:?} with {active} active"
            );
        }
    }

    #[test]
    fn prunes_the_oldest_beyond_each_limit() {
        let run = |id: &str, minute: u32, ok: bool| {
            (
                id.to_string(),
                at(&format!("2026-11-21T10:{minute:02}:00Z")),
                ok,
            )
        };
        // Listed out of order, as a store might.
        let runs = [
            run("r5", 5, true),
            run("r1", 1, true),
            run("r3", 3, false),
            run("r2", 2, false),
            run("r4", 4, true),
            run("r6", 6, false),
            run("r0", 0, true),
        ];
        assert_eq!(prune_history(&runs, 2, 1), ["r0", "r1", "r2", "r3"]);
        assert_eq!(prune_history(&runs, 3, 5), ["r0"]);
        assert!(prune_history(&runs, 10, 10).is_empty());
        assert_eq!(prune_history(&runs, 0, 0).len(), runs.len());
        assert!(prune_history(&[], 0, 0).is_empty());
    }

    #[test]
    fn retry_ids_round_trip_to_their_base() {
        let docs = bramble_api::parse::parse_manifests(
            "j.yaml",
            "apiVersion: bramble/v1\nkind: Job\nmetadata: {name: j}\nspec: {image: a, retries: 2}\n",
        )
        .expect("valid").workloads;
        let w = StoredWorkload::new(docs[0].manifest.clone(), Utc::now());
        let mut t = run_task(&w, "j-abc-0".into(), None, 0, Utc::now());
        assert_eq!(base_id(&t), "j-abc-0");
        t.id = retry_id("j-abc-0", 2);
        t.attempt = 2;
        assert_eq!(base_id(&t), "j-abc-0");
    }

    #[test]
    fn retries_back_off_exponentially_up_to_a_cap() {
        let (initial, max) = (Duration::from_secs(1), Duration::from_secs(60));
        let cases = [
            (0, 1),
            (1, 1),
            (2, 2),
            (3, 4),
            (6, 32),
            (7, 60),
            (40, 60),
            (u32::MAX, 60),
        ];
        assert_eq!(RETRY, Backoff::new(initial, max));
        for (attempt, secs) in cases {
            assert_eq!(
                RETRY.delay(attempt),
                Duration::from_secs(secs),
                "attempt {attempt}"
            );
        }
        assert_eq!(
            Backoff::new(Duration::from_secs(90), max).delay(1),
            max,
            "the cap wins over initial"
        );

        let cases = [
            (1, None, false),
            (1, Some(0), false),
            (1, Some(2), true),
            (2, Some(2), true),
            (3, Some(2), false),
        ];
        for (attempts, retries, want) in cases {
            assert_eq!(
                should_retry(attempts, retries),
                want,
                "{attempts} attempts, retries {retries:?}"
            );
        }
    }

    fn any_schedule() -> impl Strategy<Value = Schedule> {
        let exprs = vec![
            "*/10 * * * *",
            "0 * * * *",
            "30 2 * * *",
            "*/15 * * * *",
            "*/7 * * * * *",
            "15,45 1-3 * * *",
            "@daily",
            "0 0 * * MON",
            "30 * * * *",
        ];
        let zones = vec![
            "UTC",
            "Europe/Stockholm",
            "America/New_York",
            "Australia/Lord_Howe",
        ];
        (
            proptest::sample::select(exprs),
            proptest::sample::select(zones),
        )
            .prop_map(|(e, z)| sched(e, z))
    }

    /// A time near a 2026 clock change in one of the zones above, or anywhere in 2026.
    fn any_time() -> impl Strategy<Value = DateTime<Utc>> {
        let edges = vec![
            "2026-03-29T01:00:00Z",
            "2026-10-25T01:00:00Z",
            "2026-03-08T07:00:00Z",
            "2026-11-01T06:00:00Z",
            "2026-04-04T15:00:00Z",
            "2026-10-03T15:30:00Z",
        ];
        prop_oneof![
            (
                proptest::sample::select(edges),
                -4 * 3_600_000i64..4 * 3_600_000
            )
                .prop_map(|(e, ms)| at(e) + TimeDelta::milliseconds(ms)),
            (1_767_225_600_000i64..1_798_761_600_000)
                .prop_map(|ms| DateTime::from_timestamp_millis(ms).expect("2026")),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        #[test]
        fn due_never_fires_twice_or_early(
            s in any_schedule(),
            now in any_time(),
            // Last slot and creation, as offsets back from (or, for a clock that went
            // back, ahead of) now.
            last_back in proptest::option::of(-3_600i64..6 * 3_600),
            created_back in 0i64..30 * 3_600,
            deadline in proptest::option::of(0u64..3_600),
        ) {
            let last = last_back.map(|b| now - TimeDelta::seconds(b));
            let created = now - TimeDelta::seconds(created_back);
            let deadline = deadline.map(Duration::from_secs);
            let d = due(&s, last, created, now, deadline);
            let start = last.map_or(created, |l| l.max(created));

            if let Some(f) = d.fire {
                prop_assert!(f > start && f <= now, "fire {f} outside ({start}, {now}]");
                prop_assert!(!d.missed.contains(&f));
                prop_assert!(d.missed.iter().all(|m| *m < f));
            }
            prop_assert!(d.missed.len() <= MAX_MISSED);
            prop_assert!(d.missed.windows(2).all(|w| w[0] < w[1]), "missed not ascending");
            prop_assert!(d.missed.iter().all(|m| *m > start && *m <= now));
            prop_assert!(d.next.is_some_and(|n| n > now && n > start));

            // Recording the outcome, then asking again at the same instant, does nothing.
            let again = due(&s, d.last_slot().or(last), created, now, deadline);
            prop_assert_eq!(again.fire, None);
            prop_assert!(again.missed.is_empty());
            prop_assert_eq!(again.next, d.next);
        }
    }

    /// A CronJob made at `created`, with `policy`.
    fn cronjob(expr: &str, policy: &str, created: DateTime<Utc>) -> StoredWorkload {
        let yaml = format!(
            "apiVersion: bramble/v1\nkind: CronJob\nmetadata: {{name: tick}}\nspec:\n  image: busybox\n  schedule: \"{expr}\"\n  concurrencyPolicy: {policy}\n  startingDeadline: 30s\n"
        );
        let docs = bramble_api::parse::parse_manifests("t.yaml", &yaml)
            .unwrap_or_else(|e| panic!("{e:?}"))
            .workloads;
        StoredWorkload::new(docs[0].manifest.clone(), created)
    }

    fn snapshot_of(w: StoredWorkload) -> Snapshot {
        let mut snap = Snapshot::default();
        let key = model::workload_key(w.kind(), w.name());
        snap.insert(&key, Item::Workload(w), 1, 1);
        snap.revision = 1;
        snap
    }

    /// Commits `change` as the store would: all or nothing, refused when a write that
    /// expects its key absent finds it there (what makes a slot fire once).
    fn commit(snap: &mut Snapshot, change: &Change) -> bool {
        let present = |snap: &Snapshot, key: &str| {
            snap.firings.contains_key(key)
                || key
                    .strip_prefix(model::TASKS)
                    .is_some_and(|id| snap.tasks.contains_key(id))
        };
        if change
            .writes
            .iter()
            .any(|w| w.expect == Expect::Absent && present(snap, &w.key))
        {
            return false;
        }
        snap.revision += 1;
        let rev = snap.revision;
        for w in &change.writes {
            match &w.value {
                Some(item) => snap.insert(&w.key, item.clone(), rev, rev),
                None => snap.remove(&w.key),
            }
        }
        true
    }

    /// Runs the cron loop on a fake clock from `from` to `to`, as the shell does: a pass,
    /// its changes committed, then a sleep until what it says is next (at most a second,
    /// and a little late), or 1 ms after a commit (the commit wakes it).
    fn run_loop(snap: &mut Snapshot, from: DateTime<Utc>, to: DateTime<Utc>) {
        let mut now = from;
        let mut tick = 0i64;
        while now < to {
            let (changes, next) = pass(snap, now);
            let mut committed = false;
            for c in &changes {
                committed |= commit(snap, c);
            }
            tick += 1;
            now = if committed {
                now + TimeDelta::milliseconds(1)
            } else {
                let resync = now + TimeDelta::seconds(1);
                next.map_or(resync, |n| n.min(resync)).max(now)
                    + TimeDelta::milliseconds(1 + tick % 5)
            };
        }
    }

    #[test]
    fn every_slot_is_fired_once_ahead_of_time_and_its_run_starts_at_the_slot() {
        let lead = TimeDelta::from_std(LEAD).unwrap_or_default();
        // Every 10 s; every second (a period shorter than the lead); Allow and Forbid
        // (runs never finish here, so under Forbid only the first slot may fire ahead).
        // Slots up to the loop's end plus the lead are fired.
        for (expr, policy, secs, fired) in [
            ("*/10 * * * * *", "Allow", 120, 12),
            ("* * * * * *", "Allow", 60, 62),
            ("*/10 * * * * *", "Forbid", 120, 1),
        ] {
            let t0 = at("2026-12-01T10:00:00.400Z");
            let mut snap = snapshot_of(cronjob(expr, policy, t0));
            run_loop(&mut snap, t0, t0 + TimeDelta::seconds(secs));
            let firings = snap.firings_of("tick");
            let runs: Vec<_> = firings
                .iter()
                .filter(|f| f.value.outcome == FiringOutcome::Fired)
                .collect();
            assert_eq!(runs.len(), fired, "{expr} {policy}");
            assert!(
                firings
                    .iter()
                    .all(|f| f.value.outcome != FiringOutcome::Missed),
                "{expr} {policy}: nothing is missed: {firings:?}"
            );
            for f in runs {
                let id = f.value.task.as_deref().unwrap_or_default();
                let task = &snap.task(id).unwrap_or_else(|| panic!("{id}")).value;
                let decided = f.value.decided_at;
                assert!(
                    decided < f.value.slot && decided >= f.value.slot - lead,
                    "{expr} {policy}: slot {} decided at {decided}",
                    f.value.slot
                );
                assert_eq!(
                    reconcile::not_before(task),
                    Some(f.value.slot),
                    "{expr} {policy}: the run starts at its slot"
                );
            }
        }
    }

    #[test]
    fn forbid_and_replace_with_a_run_going_decide_at_the_slot_not_ahead() {
        let t0 = at("2026-12-01T10:00:00.400Z");
        let slot = at("2026-12-01T10:00:10Z");
        for (policy, outcome) in [
            ("Forbid", FiringOutcome::Skipped),
            ("Replace", FiringOutcome::Fired),
            ("Allow", FiringOutcome::Fired),
        ] {
            let mut snap = snapshot_of(cronjob("*/10 * * * * *", policy, t0));
            let w = snap
                .workload(Kind::CronJob, "tick")
                .map(|w| w.value.clone())
                .unwrap_or_else(|| panic!("the job"));
            let running = run_task(&w, "tick-old".into(), Some(t0), 0, t0);
            assert!(commit(
                &mut snap,
                &Change::new(vec![Write::task(running, 0)], vec![])
            ));

            let (changes, next) = pass(&snap, slot - TimeDelta::milliseconds(1500));
            if policy == "Allow" {
                assert_eq!(changes.len(), 1, "Allow fires ahead whatever runs");
                assert!(commit(&mut snap, &changes[0]));
            } else {
                assert!(changes.is_empty(), "{policy}: nothing ahead: {changes:?}");
                assert_eq!(next, Some(slot), "{policy}: decided at the slot");
                let (changes, _) = pass(&snap, slot + TimeDelta::milliseconds(3));
                for c in &changes {
                    assert!(commit(&mut snap, c));
                }
            }
            let recorded: Vec<_> = snap
                .firings_of("tick")
                .iter()
                .map(|f| (f.value.slot, f.value.outcome))
                .collect();
            assert_eq!(recorded, vec![(slot, outcome)], "{policy}");
            // Decided once: the passes up to the next slot's lead change nothing more.
            for ms in [0, 100, 5000, 7900] {
                let (changes, _) = pass(&snap, slot + TimeDelta::milliseconds(ms));
                let again = changes
                    .iter()
                    .flat_map(|c| &c.writes)
                    .any(|w| w.key == firing_key("tick", slot));
                assert!(!again, "{policy}: {changes:?}");
            }
        }
    }

    #[test]
    fn a_job_suspended_between_a_firing_ahead_and_its_slot_does_not_run_it() {
        let t0 = at("2026-12-01T10:00:00.400Z");
        let slot = at("2026-12-01T10:00:10Z");
        let mut snap = snapshot_of(cronjob("*/10 * * * * *", "Allow", t0));
        let (changes, _) = pass(&snap, slot - TimeDelta::milliseconds(1500));
        assert_eq!(changes.len(), 1);
        assert!(commit(&mut snap, &changes[0]));
        let id = task_id_for("tick", slot);
        assert!(snap.task(&id).is_some(), "fired ahead");

        let now = slot - TimeDelta::milliseconds(700);
        let change = suspend(&snap, "tick", true, now).unwrap_or_else(|e| panic!("{e}"));
        assert!(commit(&mut snap, &change));
        let run = &snap.task(&id).unwrap_or_else(|| panic!("kept")).value;
        assert_eq!(run.desired, DesiredState::Stopped);
        let f = snap.firings_of("tick");
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].value.outcome, FiringOutcome::Skipped);
        assert_eq!(f[0].value.task, None);

        // Resumed after the slot: the slot stays decided; the next one fires.
        let change = suspend(&snap, "tick", false, slot + TimeDelta::seconds(1))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(commit(&mut snap, &change));
        run_loop(
            &mut snap,
            slot + TimeDelta::seconds(1),
            slot + TimeDelta::seconds(12),
        );
        let slots: Vec<_> = snap
            .firings_of("tick")
            .iter()
            .map(|f| (f.value.slot, f.value.outcome))
            .collect();
        assert_eq!(
            slots,
            vec![
                (slot, FiringOutcome::Skipped),
                (at("2026-12-01T10:00:20Z"), FiringOutcome::Fired)
            ]
        );

        // A run that has started (a clock running ahead) is not the suspension's to stop.
        let mut snap = snapshot_of(cronjob("*/10 * * * * *", "Allow", t0));
        let (changes, _) = pass(&snap, slot - TimeDelta::milliseconds(1500));
        assert!(commit(&mut snap, &changes[0]));
        let mut started = snap
            .task(&id)
            .map(|t| t.value.clone())
            .unwrap_or_else(|| panic!("run"));
        started.started_at = Some(now);
        let write = Write {
            key: model::task_key(&id),
            expect: Expect::Any,
            value: Some(Item::Task(started)),
        };
        assert!(commit(&mut snap, &Change::new(vec![write], vec![])));
        let change = suspend(&snap, "tick", true, now).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(change.writes.len(), 1, "the job's state only: {change:?}");
    }
}
