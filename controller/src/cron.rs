//! The pure decisions of CronJob scheduling: which slot fires now and which were
//! missed, the unique key and task id of a firing, the concurrency policy, history
//! pruning and retries. Time is always an argument; the I/O shell records a firing
//! under [`firing_key`] (create-if-absent) before it dispatches the task, so a second
//! controller that computes the same slot fails on the key instead of firing twice.
//!
//! Slots are the instants of [`Schedule::next_after`]: whole seconds, with the
//! daylight-saving rule documented in [`bramble_api::schedule`].

use std::time::Duration;

use bramble_api::manifest::ConcurrencyPolicy;
use bramble_api::schedule::Schedule;
use chrono::{DateTime, SecondsFormat, TimeDelta, Utc};

/// Prefix of all firing keys in the store.
pub const FIRINGS: &str = "/cronfirings/";

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

/// The wait before retry number `attempt` (1 = the first retry) of a failed run:
/// `initial`, doubling each time, never more than `max`.
pub fn retry_delay(attempt: u32, initial: Duration, max: Duration) -> Duration {
    let doublings = attempt.saturating_sub(1);
    // 2^31 times any delay overflows or exceeds any sane cap; saturate to `max`.
    2u32.checked_pow(doublings)
        .and_then(|factor| initial.checked_mul(factor))
        .map_or(max, |d| d.min(max))
}

/// Whether a run that failed after `attempts_so_far` attempts (the first run counts as
/// one) is tried again: a job with `retries: n` runs at most `1 + n` times; no
/// `retries` means no retry.
pub fn should_retry(attempts_so_far: u32, retries: Option<u32>) -> bool {
    attempts_so_far <= retries.unwrap_or(0)
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
        for (attempt, secs) in cases {
            assert_eq!(
                retry_delay(attempt, initial, max),
                Duration::from_secs(secs),
                "attempt {attempt}"
            );
        }
        assert_eq!(
            retry_delay(1, Duration::from_secs(90), max),
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
}
