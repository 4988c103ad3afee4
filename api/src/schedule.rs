//! CronJob schedules: a cron expression in an IANA time zone, and the instants it fires.
//!
//! The expression is parsed by [`croner`] (never by hand): five fields (minute, hour,
//! day of month, month, day of week), or six with a leading seconds field, or one of
//! `@yearly`, `@annually`, `@monthly`, `@weekly`, `@daily`, `@midnight`, `@hourly`.
//! Croner's extensions are accepted too: `L` (last), `W` (nearest weekday), `#`
//! (nth weekday), `?` (same as `*`) and a leading `+` on the day of week (day of month
//! AND day of week; without it either may match, as in Vixie cron). Month and weekday
//! names (`JAN`, `MON-FRI`) work in any case.
//!
//! # Daylight saving time
//!
//! A schedule names wall-clock times in its zone, and every wall-clock time it names
//! fires exactly once:
//! - a wall time that happens twice (autumn fall-back) fires at its **first**
//!   occurrence only;
//! - a wall time that does not happen (spring forward) fires at the **first instant
//!   after the gap**: `30 2 * * *` in Europe/Stockholm fires at 03:00 local on
//!   2026-03-29. Several skipped wall times fall on that one instant and fire once.
//!
//! For a fixed daily time (`30 2 * * *`) this is what croner and Vixie cron do. For
//! interval schedules (`0 * * * *`, `*/15 * * * *`, lists, ranges) croner, like Vixie
//! cron, follows absolute time instead: it fires the repeated hour twice and drops the
//! skipped one. Bramble applies the wall-clock rule to every schedule, because a payout
//! that runs twice in the repeated hour or not at all in the skipped one costs money,
//! while one that runs once is what the operator wrote. The price: an hourly job does
//! not run during the repeated hour's second pass (two real hours between 02:00 and
//! 03:00 on the fall-back day), and `30 * * * *` fires at 03:00 and 03:30 on the
//! spring-forward day.

use std::fmt;

use chrono::{DateTime, LocalResult, NaiveDateTime, Offset, TimeZone, Utc};
use chrono_tz::Tz;
use croner::errors::CronError;
use croner::parser::{CronParser, Seconds, Year};
use croner::{Cron, CronPattern, Weekday};

/// A parsed cron expression in a time zone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    expr: String,
    tz: Tz,
    cron: Cron,
}

/// Why a schedule or a time zone was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    /// The cron expression does not parse, or matches no date at all.
    #[error("invalid schedule {expr:?}: {reason}")]
    Expr {
        /// The expression as written.
        expr: String,
        /// What is wrong with it, naming the field.
        reason: String,
    },
    /// The time zone is not in the IANA database.
    #[error("unknown time zone {name:?}: {}", tz_hint(.suggestion.as_deref()))]
    TimeZone {
        /// The name as written.
        name: String,
        /// A known zone with a similar name.
        suggestion: Option<String>,
    },
}

fn tz_hint(suggestion: Option<&str>) -> String {
    match suggestion {
        Some(s) => format!("did you mean {s:?}?"),
        None => "expected an IANA name such as \"Europe/Stockholm\" or \"UTC\"".to_string(),
    }
}

/// The macros croner expands (plus `@midnight`, which we map to `@daily` as Vixie
/// cron and Kubernetes do).
const MACROS: [&str; 7] = [
    "@yearly",
    "@annually",
    "@monthly",
    "@weekly",
    "@daily",
    "@midnight",
    "@hourly",
];

/// The six fields, seconds first: name and what is allowed, for error messages.
const FIELDS: [(&str, u32, u32, &str); 6] = [
    ("second", 0, 59, ""),
    ("minute", 0, 59, ""),
    ("hour", 0, 23, ""),
    ("day-of-month", 1, 31, ", L, W, ?"),
    ("month", 1, 12, " or JAN-DEC"),
    (
        "day-of-week",
        0,
        7,
        " or SUN-SAT (0 and 7 are Sunday), L, #, ?",
    ),
];

/// Offsets on Earth stay within ±16 hours (the widest were local mean times of the
/// 1800s); searches for a DST edge look this far either side.
const MAX_OFFSET: i64 = 18 * 3600;
/// A repeated range of wall time never lasts more than a day (the longest, Alaska's
/// 1867 change of date, was 24 hours); the fold search looks back this far.
const MAX_FOLD: i64 = 26 * 3600;

fn parser() -> CronParser {
    // Years are croner's extension, not cron: a 7th field is an error, not a surprise.
    CronParser::builder()
        .seconds(Seconds::Optional)
        .year(Year::Disallowed)
        .build()
}

impl Schedule {
    /// Parses a cron expression (see the module docs) in the IANA zone `tz`, UTC when
    /// `None`. Rejects expressions that match no date at all (`0 0 30 2 *`).
    pub fn parse(expr: &str, tz: Option<&str>) -> Result<Schedule, ScheduleError> {
        let cron = parse_expr(expr)?;
        let tz = match tz {
            Some(name) => parse_timezone(name)?,
            None => Tz::UTC,
        };
        Ok(Schedule {
            expr: expr.trim().to_string(),
            tz,
            cron,
        })
    }

    /// The expression as written (trimmed).
    pub fn expr(&self) -> &str {
        &self.expr
    }

    /// The zone whose wall clock the expression reads.
    pub fn timezone(&self) -> Tz {
        self.tz
    }

    /// The first firing strictly after `t`, under the daylight-saving rule of the module
    /// docs; `None` only if there is none before croner's horizon (year 5000).
    /// Firings are whole seconds.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let (mut wall, shown) = self.high_water(t.timestamp())?;
        // A wall time the clock has shown has fired; one it has not shown is next.
        let mut inclusive = !shown;
        // One search suffices (see `high_water`); the loop only guards against time zone
        // data stranger than any real zone. It ends: each round moves the wall time on,
        // and an instant is never more than `MAX_OFFSET` behind its wall time.
        loop {
            let w = self.cron.find_next_occurrence(&wall, inclusive).ok()?;
            let at = self.instant_of(w)?;
            if at > t {
                return Some(at);
            }
            (wall, inclusive) = (w, false);
        }
    }

    /// The last firing at or before `t` (the counterpart of [`Schedule::next_after`]);
    /// `None` if there is none since year 1.
    pub fn latest_at_or_before(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let (mut wall, mut inclusive) = self.high_water(t.timestamp())?;
        // Same guard as in `next_after`, walking back.
        loop {
            let w = self.cron.find_previous_occurrence(&wall, inclusive).ok()?;
            let at = self.instant_of(w)?;
            if at <= t {
                return Some(at);
            }
            (wall, inclusive) = (w, false);
        }
    }

    /// The highest wall time the zone's clock has shown up to UTC second `t`, as
    /// (wall time, whether it was actually shown). Wall times up to it have fired by
    /// `t`; later ones have not, because each fires when the clock first reaches it.
    ///
    /// That is the clock at `t`, except in the second pass of a fall-back: there the
    /// clock showed everything up to the moment it went back (03:00 in Stockholm,
    /// never reached before the change, so "not shown").
    fn high_water(&self, t: i64) -> Option<(NaiveDateTime, bool)> {
        let off_now = self.offset(t);
        let local = wall(t + off_now)?;
        let off_before = self.offset(t - MAX_FOLD);
        if off_before > off_now {
            // The clock went back within the window: find when (the first second with
            // today's offset), and the wall time it went back from.
            let (mut lo, mut hi) = (t - MAX_FOLD, t);
            while hi - lo > 1 {
                let mid = lo + (hi - lo) / 2;
                if self.offset(mid) == off_now {
                    hi = mid;
                } else {
                    lo = mid;
                }
            }
            let went_back_from = wall(hi + off_before)?;
            if went_back_from > local {
                return Some((went_back_from, false));
            }
        }
        Some((local, true))
    }

    /// The instant a matching wall time fires: itself, its first occurrence if it
    /// happens twice, or the end of the gap if it does not happen.
    fn instant_of(&self, w: NaiveDateTime) -> Option<DateTime<Utc>> {
        match self.tz.from_local_datetime(&w) {
            LocalResult::Single(at) | LocalResult::Ambiguous(at, _) => Some(at.to_utc()),
            LocalResult::None => {
                // The first second whose wall time is at or past `w`. Within the
                // window, wall time rises with UTC except for the one jump over `w`,
                // so the predicate is monotone and bisection finds the jump.
                let w = w.and_utc().timestamp();
                let (mut lo, mut hi) = (w - MAX_OFFSET, w + MAX_OFFSET);
                while hi - lo > 1 {
                    let mid = lo + (hi - lo) / 2;
                    if mid + self.offset(mid) >= w {
                        hi = mid;
                    } else {
                        lo = mid;
                    }
                }
                DateTime::from_timestamp(hi, 0)
            }
        }
    }

    /// The zone's offset from UTC, in seconds, at UTC second `t`.
    fn offset(&self, t: i64) -> i64 {
        let naive = DateTime::from_timestamp(t, 0)
            .unwrap_or_default()
            .naive_utc();
        i64::from(
            self.tz
                .offset_from_utc_datetime(&naive)
                .fix()
                .local_minus_utc(),
        )
    }
}

/// A wall time from seconds since the epoch of the wall clock.
fn wall(secs: i64) -> Option<NaiveDateTime> {
    DateTime::from_timestamp(secs, 0).map(|d| d.naive_utc())
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.expr, self.tz.name())
    }
}

/// Parses an IANA time zone name (`Europe/Stockholm`, `UTC`), suggesting a close
/// match when it is unknown.
pub fn parse_timezone(name: &str) -> Result<Tz, ScheduleError> {
    name.trim()
        .parse::<Tz>()
        .map_err(|_| ScheduleError::TimeZone {
            name: name.to_string(),
            suggestion: suggest_timezone(name.trim()),
        })
}

/// The known zone closest to `name`: the same but for case, or at most two edits away.
fn suggest_timezone(name: &str) -> Option<String> {
    // Edit distance is quadratic; a name this long is not a typo of a zone.
    if name.is_empty() || name.len() > 64 {
        return None;
    }
    chrono_tz::TZ_VARIANTS
        .iter()
        .map(|tz| tz.name())
        .filter_map(|known| Some((edits_within(name, known, 2)?, known)))
        .min()
        .map(|(_, known)| known.to_string())
}

/// The edit distance (Levenshtein, over bytes, ignoring ASCII case: zone names are
/// ASCII) between `a` and `b` if it is at most `max`. Every one of the ~600 zones is
/// measured against each unknown name, so the work is cut short: names whose lengths
/// differ by more than `max` are not compared, and a comparison stops at the first row
/// already past `max`.
fn edits_within(a: &str, b: &str, max: usize) -> Option<usize> {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len().abs_diff(b.len()) > max {
        return None;
    }
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for (i, ca) in a.iter().enumerate() {
        cur[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let subst = prev[j] + usize::from(!ca.eq_ignore_ascii_case(cb));
            cur[j + 1] = subst.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        // A row's least value never falls in later rows.
        if cur.iter().min().is_some_and(|least| *least > max) {
            return None;
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    Some(prev[b.len()]).filter(|d| *d <= max)
}

fn parse_expr(expr: &str) -> Result<Cron, ScheduleError> {
    let bad = |reason: String| ScheduleError::Expr {
        expr: expr.to_string(),
        reason,
    };
    let text = expr.trim();
    if text.is_empty() {
        return Err(bad("must not be empty".into()));
    }
    if text.starts_with('@') {
        let lower = text.to_ascii_lowercase();
        if !MACROS.contains(&lower.as_str()) {
            return Err(bad(format!(
                "unknown macro {text:?}: expected one of {}",
                MACROS.join(", ")
            )));
        }
        let expanded = if lower == "@midnight" {
            "@daily"
        } else {
            &lower
        };
        return parser()
            .parse(expanded)
            .map_err(|e| bad(croner_message(&e)));
    }

    let fields: Vec<&str> = text.split_whitespace().collect();
    if !(5..=6).contains(&fields.len()) {
        return Err(bad(format!(
            "expected 5 fields (minute hour day-of-month month day-of-week) or 6 with a leading seconds field, found {}",
            fields.len()
        )));
    }
    let cron = parser().parse(text).map_err(|e| bad(locate(&fields, &e)))?;

    // A field that allows no value at all (a list of nothing, `,,`) matches no date; said
    // here, as croner would look for one second by second up to its horizon, which
    // takes a minute.
    let p = &cron.pattern;
    for (name, c) in [
        ("seconds", &p.seconds),
        ("minute", &p.minutes),
        ("hour", &p.hours),
        ("month", &p.months),
    ] {
        if c.values().is_empty() {
            return Err(bad(format!(
                "matches no date: the {name} field allows no value"
            )));
        }
    }
    for (name, c) in [("day-of-month", &p.days), ("day-of-week", &p.days_of_week)] {
        if c.values().is_empty() && !c.has_modifiers() {
            return Err(bad(format!(
                "matches no date: the {name} field allows no value"
            )));
        }
    }

    if !dates_meet(&cron.pattern) {
        return Err(bad(
            "matches no date: the day-of-month, month and day-of-week fields never meet (e.g. 30 February)"
                .into(),
        ));
    }
    Ok(cron)
}

/// Whether the date fields of `p` (day of month, month, day of week) meet on some day.
///
/// Years are not part of a pattern, so this is a question about the calendar's fourteen
/// kinds of year (the weekday of 1 January, leap or not), and 2000–2027 hold every one
/// of them: seven leap years starting on seven different weekdays, and each common kind
/// three times. A walk through those 28 years answers for all time in at most 10,227
/// day checks, by croner's own matcher. Croner's search for a date that never comes
/// (`0 0 31 2 *`) runs on to its horizon, year 5000, which takes milliseconds an
/// expression: a manifest of such CronJobs could keep a controller busy.
fn dates_meet(p: &CronPattern) -> bool {
    // 2000-01-01 was a Saturday.
    let mut first = Weekday::Saturday;
    for year in 2000..2028 {
        for month in 1..=12 {
            let length = croner::time::days_in_month(year, month);
            if p.month_match(month).unwrap_or(false) {
                let meets = (1..=length).any(|day| {
                    let weekday = first.shift(day as i32 - 1);
                    p.day_match(year, month, day, weekday).unwrap_or(false)
                });
                if meets {
                    return true;
                }
            }
            first = first.shift(length as i32);
        }
    }
    false
}

/// Names the first field croner rejects on its own, or croner's message as is.
fn locate(fields: &[&str], whole: &CronError) -> String {
    // A 5-field expression has no seconds: its fields start at the minute.
    let skip = 6 - fields.len();
    for (i, field) in fields.iter().enumerate() {
        let at = i + skip;
        let mut probe = ["0", "*", "*", "*", "*", "*"];
        probe[at] = field;
        let Err(e) = parser().parse(&probe.join(" ")) else {
            continue;
        };
        let (name, lo, hi, extra) = FIELDS[at];
        if let Ok(n) = field.parse::<u64>() {
            if n < u64::from(lo) || n > u64::from(hi) {
                return format!("{name} {n} out of range {lo}-{hi}");
            }
        }
        let why = match &e {
            // Croner's text names its internals; say what is allowed instead.
            CronError::IllegalCharacters(_) => "unexpected character".to_string(),
            other => croner_message(other),
        };
        return format!("{name} {field:?}: {why} (allowed: {lo}-{hi}{extra}, with * , - /)");
    }
    croner_message(whole)
}

/// Croner's message without its type prefix, as a clause.
fn croner_message(e: &CronError) -> String {
    let text = match e {
        CronError::InvalidPattern(m)
        | CronError::IllegalCharacters(m)
        | CronError::ComponentError(m) => m.clone(),
        other => other.to_string(),
    };
    let text = text.trim_end_matches('.');
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse::parse_manifests;
    use chrono::TimeDelta;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s)
            .unwrap_or_else(|e| panic!("bad test time {s}: {e}"))
            .to_utc()
    }

    fn sched(expr: &str, tz: &str) -> Schedule {
        Schedule::parse(expr, Some(tz)).unwrap_or_else(|e| panic!("{e}"))
    }

    /// The next `n` firings after `from`, as instants.
    fn firings(s: &Schedule, from: &str, n: usize) -> Vec<DateTime<Utc>> {
        let mut t = at(from);
        let mut out = Vec::new();
        for _ in 0..n {
            t = s.next_after(t).expect("fires again");
            out.push(t);
        }
        out
    }

    #[test]
    fn next_fire_math_across_dst_transitions() {
        // (expression, zone, search from, the firings that follow, in local time)
        let cases: &[(&str, &str, &str, &[&str])] = &[
            // Stockholm, spring forward 2026-03-29: 02:00 CET becomes 03:00 CEST.
            (
                "30 2 * * *",
                "Europe/Stockholm",
                "2026-03-28T12:00:00+01:00",
                &["2026-03-29T03:00:00+02:00", "2026-03-30T02:30:00+02:00"],
            ),
            (
                "0 * * * *",
                "Europe/Stockholm",
                "2026-03-29T00:30:00+01:00",
                &[
                    "2026-03-29T01:00:00+01:00",
                    "2026-03-29T03:00:00+02:00",
                    "2026-03-29T04:00:00+02:00",
                ],
            ),
            (
                "*/15 * * * *",
                "Europe/Stockholm",
                "2026-03-29T01:40:00+01:00",
                &[
                    "2026-03-29T01:45:00+01:00",
                    "2026-03-29T03:00:00+02:00",
                    "2026-03-29T03:15:00+02:00",
                ],
            ),
            // 02:30 does not happen: it fires at the end of the gap, then 03:30 as usual.
            (
                "30 * * * *",
                "Europe/Stockholm",
                "2026-03-29T01:00:00+01:00",
                &[
                    "2026-03-29T01:30:00+01:00",
                    "2026-03-29T03:00:00+02:00",
                    "2026-03-29T03:30:00+02:00",
                ],
            ),
            (
                "*/5 * * * * *",
                "Europe/Stockholm",
                "2026-03-29T01:59:50+01:00",
                &[
                    "2026-03-29T01:59:55+01:00",
                    "2026-03-29T03:00:00+02:00",
                    "2026-03-29T03:00:05+02:00",
                ],
            ),
            // Stockholm, fall back 2026-10-25: 03:00 CEST becomes 02:00 CET.
            (
                "30 2 * * *",
                "Europe/Stockholm",
                "2026-10-24T12:00:00+02:00",
                &["2026-10-25T02:30:00+02:00", "2026-10-26T02:30:00+01:00"],
            ),
            (
                "0 * * * *",
                "Europe/Stockholm",
                "2026-10-25T00:30:00+02:00",
                &[
                    "2026-10-25T01:00:00+02:00",
                    "2026-10-25T02:00:00+02:00",
                    "2026-10-25T03:00:00+01:00",
                ],
            ),
            (
                "*/15 * * * *",
                "Europe/Stockholm",
                "2026-10-25T02:40:00+02:00",
                &[
                    "2026-10-25T02:45:00+02:00",
                    "2026-10-25T03:00:00+01:00",
                    "2026-10-25T03:15:00+01:00",
                ],
            ),
            (
                "*/5 * * * * *",
                "Europe/Stockholm",
                "2026-10-25T02:59:50+02:00",
                &["2026-10-25T02:59:55+02:00", "2026-10-25T03:00:00+01:00"],
            ),
            // Searching from inside the repeated hour's second pass.
            (
                "*/15 * * * *",
                "Europe/Stockholm",
                "2026-10-25T02:10:00+01:00",
                &["2026-10-25T03:00:00+01:00"],
            ),
            (
                "30 2 * * *",
                "Europe/Stockholm",
                "2026-10-25T02:10:00+01:00",
                &["2026-10-26T02:30:00+01:00"],
            ),
            // New York, spring forward 2026-03-08: 02:00 EST becomes 03:00 EDT.
            (
                "30 2 * * *",
                "America/New_York",
                "2026-03-07T12:00:00-05:00",
                &["2026-03-08T03:00:00-04:00", "2026-03-09T02:30:00-04:00"],
            ),
            (
                "0 * * * *",
                "America/New_York",
                "2026-03-08T00:30:00-05:00",
                &["2026-03-08T01:00:00-05:00", "2026-03-08T03:00:00-04:00"],
            ),
            (
                "*/15 * * * *",
                "America/New_York",
                "2026-03-08T01:40:00-05:00",
                &[
                    "2026-03-08T01:45:00-05:00",
                    "2026-03-08T03:00:00-04:00",
                    "2026-03-08T03:15:00-04:00",
                ],
            ),
            // New York, fall back 2026-11-01: 02:00 EDT becomes 01:00 EST.
            (
                "30 1 * * *",
                "America/New_York",
                "2026-10-31T12:00:00-04:00",
                &["2026-11-01T01:30:00-04:00", "2026-11-02T01:30:00-05:00"],
            ),
            (
                "30 2 * * *",
                "America/New_York",
                "2026-10-31T12:00:00-04:00",
                &["2026-11-01T02:30:00-05:00", "2026-11-02T02:30:00-05:00"],
            ),
            (
                "0 * * * *",
                "America/New_York",
                "2026-11-01T00:30:00-04:00",
                &[
                    "2026-11-01T01:00:00-04:00",
                    "2026-11-01T02:00:00-05:00",
                    "2026-11-01T03:00:00-05:00",
                ],
            ),
            (
                "*/15 * * * *",
                "America/New_York",
                "2026-11-01T01:40:00-04:00",
                &["2026-11-01T01:45:00-04:00", "2026-11-01T02:00:00-05:00"],
            ),
            // Macros.
            (
                "@hourly",
                "UTC",
                "2026-11-21T10:10:00Z",
                &["2026-11-21T11:00:00Z", "2026-11-21T12:00:00Z"],
            ),
            (
                "@daily",
                "Europe/Stockholm",
                "2026-03-28T12:00:00+01:00",
                &["2026-03-29T00:00:00+01:00", "2026-03-30T00:00:00+02:00"],
            ),
            (
                "@midnight",
                "America/New_York",
                "2026-11-01T12:00:00-05:00",
                &["2026-11-02T00:00:00-05:00"],
            ),
            // 2026-11-21 is a Saturday.
            (
                "@weekly",
                "UTC",
                "2026-11-21T10:00:00Z",
                &["2026-11-22T00:00:00Z", "2026-11-29T00:00:00Z"],
            ),
            (
                "@monthly",
                "Europe/Stockholm",
                "2026-10-15T00:00:00Z",
                &["2026-11-01T00:00:00+01:00", "2026-12-01T00:00:00+01:00"],
            ),
            (
                "@yearly",
                "UTC",
                "2026-11-21T00:00:00Z",
                &["2027-01-01T00:00:00Z", "2028-01-01T00:00:00Z"],
            ),
            (
                "@annually",
                "UTC",
                "2026-11-21T00:00:00Z",
                &["2027-01-01T00:00:00Z"],
            ),
            // A firing is strictly after the start, also when the start is on a slot.
            (
                "*/10 * * * *",
                "UTC",
                "2026-11-21T10:10:00Z",
                &["2026-11-21T10:20:00Z"],
            ),
            (
                "*/10 * * * *",
                "UTC",
                "2026-11-21T10:09:59.999Z",
                &["2026-11-21T10:10:00Z"],
            ),
            (
                "0 9 * * MON-FRI",
                "UTC",
                "2026-11-20T10:00:00Z",
                &["2026-11-23T09:00:00Z"],
            ),
        ];
        for (expr, tz, from, want) in cases {
            let s = sched(expr, tz);
            let want: Vec<DateTime<Utc>> = want.iter().map(|w| at(w)).collect();
            assert_eq!(
                firings(&s, from, want.len()),
                want,
                "{expr} in {tz} from {from}"
            );
        }
    }

    #[test]
    fn each_wall_time_fires_once_on_dst_days() {
        // Count a day's firings: every matching wall time once, the skipped ones
        // folded into the first instant after the gap.
        let cases = [
            (
                "*/15 * * * *",
                "Europe/Stockholm",
                "2026-03-29T00:00:00+01:00",
                "2026-03-30T00:00:00+02:00",
                92,
            ),
            (
                "*/15 * * * *",
                "Europe/Stockholm",
                "2026-10-25T00:00:00+02:00",
                "2026-10-26T00:00:00+01:00",
                96,
            ),
            (
                "0 * * * *",
                "America/New_York",
                "2026-11-01T00:00:00-04:00",
                "2026-11-02T00:00:00-05:00",
                24,
            ),
            (
                "0 * * * *",
                "America/New_York",
                "2026-03-08T00:00:00-05:00",
                "2026-03-09T00:00:00-04:00",
                23,
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
        ];
        for (expr, tz, from, to, want) in cases {
            let s = sched(expr, tz);
            let (mut t, end) = (at(from) - TimeDelta::seconds(1), at(to));
            let mut n = 0;
            while let Some(next) = s.next_after(t).filter(|x| *x < end) {
                n += 1;
                t = next;
            }
            assert_eq!(n, want, "{expr} in {tz} on {from}");
        }
    }

    #[test]
    fn latest_at_or_before_mirrors_next_after() {
        let s = sched("*/15 * * * *", "Europe/Stockholm");
        // In the repeated hour's second pass, the last firing is 02:45 of the first pass.
        assert_eq!(
            s.latest_at_or_before(at("2026-10-25T02:50:00+01:00")),
            Some(at("2026-10-25T02:45:00+02:00"))
        );
        assert_eq!(
            s.latest_at_or_before(at("2026-03-29T03:00:00+02:00")),
            Some(at("2026-03-29T03:00:00+02:00"))
        );
        assert_eq!(
            s.latest_at_or_before(at("2026-03-29T02:59:59+02:00")),
            Some(at("2026-03-29T01:45:00+01:00"))
        );
    }

    #[test]
    fn rejects_bad_schedules_naming_the_field() {
        let cases = [
            ("61 * * * *", "invalid schedule \"61 * * * *\": minute 61 out of range 0-59"),
            ("* 24 * * *", "hour 24 out of range 0-23"),
            ("0 0 0 * *", "day-of-month 0 out of range 1-31"),
            ("0 0 * 13 *", "month 13 out of range 1-12"),
            ("0 0 * * 8", "day-of-week 8 out of range 0-7"),
            ("60 * * * * *", "second 60 out of range 0-59"),
            ("1-61 * * * *", "minute \"1-61\": range out of bounds (allowed: 0-59"),
            ("*/0 * * * *", "minute \"*/0\": step cannot be zero"),
            ("5/10 * * * *", "minute \"5/10\": invalid step syntax"),
            ("0 x * * *", "hour \"x\": unexpected character"),
            ("0 0 * FOO *", "month \"FOO\": unexpected character (allowed: 1-12 or JAN-DEC"),
            ("* * * *", "expected 5 fields (minute hour day-of-month month day-of-week) or 6 with a leading seconds field, found 4"),
            ("0 0 1 1 * 2030", "day-of-week 2030 out of range 0-7"),
            ("* * * * * * *", "found 7"),
            ("@reboot", "unknown macro \"@reboot\": expected one of @yearly, @annually"),
            ("@every 5m", "unknown macro"),
            ("   ", "must not be empty"),
            ("0 0 30 2 *", "matches no date"),
            ("0 0 31 4,6,9,11 *", "matches no date"),
            // Found by fuzzing: a field listing nothing took croner a minute of search
            // (the fuzzer's timeout) before it said so.
            ("0,,,5,\x0c,,,,,,,,, */1 * * *", "matches no date: the minute field allows no value"),
            (", * * * * *", "the seconds field allows no value"),
            ("0 ,, * * *", "the hour field allows no value"),
            ("0 0 * ,, *", "the month field allows no value"),
            ("0 0 ,, * *", "the day-of-month field allows no value"),
            // Found by fuzzing too: `+` (day-of-month AND day-of-week) with no weekday.
            ("0 2 * * +", "the day-of-week field allows no value"),
        ];
        for (expr, want) in cases {
            let e = Schedule::parse(expr, None).expect_err(expr);
            assert!(matches!(e, ScheduleError::Expr { .. }), "{expr}: {e:?}");
            assert!(e.to_string().contains(want), "{expr}: {e}");
        }
    }

    #[test]
    fn accepts_the_usual_forms() {
        for expr in [
            "*/10 * * * *",
            "0 */5 * * * *",
            "@daily",
            "@DAILY",
            " @hourly ",
            "@midnight",
            "0 9 * * mon-fri",
            "0 0 L * *",
            "0 0 29 2 *",
            "0 12 * JAN,JUL 1#1",
            "0 0 1 * +MON",
        ] {
            assert!(Schedule::parse(expr, None).is_ok(), "{expr}");
        }
        assert_eq!(sched("@daily", "UTC").to_string(), "@daily (UTC)");
        assert_eq!(
            Schedule::parse("@daily", None).map(|s| s.timezone()),
            Ok(Tz::UTC)
        );
    }

    #[test]
    fn rejects_unknown_time_zones_with_a_hint() {
        let e = Schedule::parse("0 * * * *", Some("Europe/Stockholmm")).expect_err("typo");
        assert_eq!(
            e.to_string(),
            "unknown time zone \"Europe/Stockholmm\": did you mean \"Europe/Stockholm\"?"
        );
        let e = parse_timezone("europe/stockholm").expect_err("case matters in IANA names");
        assert!(
            e.to_string().contains("did you mean \"Europe/Stockholm\"?"),
            "{e}"
        );
        let e = parse_timezone("Mars/Olympus_Mons").expect_err("not on Earth");
        assert!(
            e.to_string()
                .starts_with("unknown time zone \"Mars/Olympus_Mons\": expected an IANA name"),
            "{e}"
        );
        assert!(parse_timezone(&"x".repeat(10_000)).is_err());
        for ok in [
            "UTC",
            "Etc/UTC",
            "Europe/Stockholm",
            "America/New_York",
            "Asia/Kolkata",
        ] {
            assert!(parse_timezone(ok).is_ok(), "{ok}");
        }
    }

    const CRON: &str =
        "apiVersion: bramble/v1\nkind: CronJob\nmetadata: {name: payout}\nspec:\n  image: p:1\n";

    #[test]
    fn manifest_with_a_bad_schedule_is_an_error_on_spec_schedule() {
        let errs = parse_manifests("c.yaml", &format!("{CRON}  schedule: '61 * * * *'\n"))
            .expect_err("bad schedule");
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(
            (errs[0].field.as_str(), errs[0].line),
            ("spec.schedule", 6),
            "{}",
            errs[0]
        );
        assert!(
            errs[0].message.contains("minute 61 out of range 0-59"),
            "{}",
            errs[0]
        );
    }

    #[test]
    fn manifest_with_an_unknown_time_zone_is_an_error_on_spec_timezone() {
        let text = format!("{CRON}  schedule: '30 2 * * *'\n  timezone: Europe/Stockholmm\n");
        let errs = parse_manifests("c.yaml", &text).expect_err("bad zone");
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(
            (errs[0].field.as_str(), errs[0].line),
            ("spec.timezone", 7),
            "{}",
            errs[0]
        );
        assert!(
            errs[0]
                .message
                .contains("unknown time zone \"Europe/Stockholmm\""),
            "{}",
            errs[0]
        );

        // Both wrong: both reported at once.
        let text = format!("{CRON}  schedule: '@reboot'\n  timezone: Nowhere\n");
        let errs = parse_manifests("c.yaml", &text).expect_err("both bad");
        let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["spec.schedule", "spec.timezone"], "{errs:?}");

        let ok = format!("{CRON}  schedule: '30 2 * * *'\n  timezone: Europe/Stockholm\n");
        assert!(parse_manifests("c.yaml", &ok).is_ok());
    }

    /// The fixed-time expressions, where croner itself applies our rule.
    fn fixed_time() -> impl proptest::strategy::Strategy<Value = String> {
        (0u32..60, 0u32..60, 0u32..24).prop_map(|(s, m, h)| format!("{s} {m} {h} * * *"))
    }

    fn any_schedule() -> impl proptest::strategy::Strategy<Value = String> {
        proptest::prop_oneof![
            fixed_time(),
            proptest::sample::select(vec![
                "*/15 * * * *",
                "0 * * * *",
                "30 * * * *",
                "*/7 * * * * *",
                "15,45 1-3 * * *",
                "0 0 * * MON",
                "@daily",
                "0 30 2 * * *",
                "*/20 2 * * *",
                "0 0 1 * *",
            ])
            .prop_map(str::to_string),
        ]
    }

    /// The 2026 clock changes (UTC) of zones with daylight saving time.
    const EDGES: [(&str, &str); 6] = [
        ("Europe/Stockholm", "2026-03-29T01:00:00Z"),
        ("Europe/Stockholm", "2026-10-25T01:00:00Z"),
        ("America/New_York", "2026-03-08T07:00:00Z"),
        ("America/New_York", "2026-11-01T06:00:00Z"),
        // Lord Howe moves its clock by 30 minutes.
        ("Australia/Lord_Howe", "2026-04-04T15:00:00Z"),
        ("Australia/Lord_Howe", "2026-10-03T15:30:00Z"),
    ];

    /// A zone and a time: near one of its clock changes, or anywhere in 2026.
    fn any_zone_time() -> impl proptest::strategy::Strategy<Value = (&'static str, DateTime<Utc>)> {
        let zones = vec![
            "UTC",
            "Europe/Stockholm",
            "America/New_York",
            "Australia/Lord_Howe",
            "Asia/Kolkata",
        ];
        proptest::prop_oneof![
            (
                proptest::sample::select(EDGES.to_vec()),
                -3 * 3600i64..3 * 3600
            )
                .prop_map(|((tz, e), d)| (tz, at(e) + TimeDelta::seconds(d))),
            (
                proptest::sample::select(zones),
                1_767_225_600i64..1_798_761_600
            )
                .prop_map(|(tz, s)| (tz, DateTime::from_timestamp(s, 0).expect("2026"))),
        ]
    }

    /// What a daemon that wakes every second does under the rule: it fires when its
    /// zone's clock first reaches (or jumps past) a matching wall time.
    fn ticking_daemon(s: &Schedule, from: DateTime<Utc>, to: DateTime<Utc>) -> Vec<DateTime<Utc>> {
        let local = |u: i64| wall(u + s.offset(u)).expect("in range");
        let mut shown = local(from.timestamp());
        let mut due = s.cron.find_next_occurrence(&shown, false).expect("fires");
        let mut fired = Vec::new();
        for u in from.timestamp() + 1..=to.timestamp() {
            let l = local(u);
            if l <= shown {
                continue; // the clock went back: these wall times have been shown
            }
            if due <= l {
                fired.push(DateTime::from_timestamp(u, 0).expect("in range"));
                due = s.cron.find_next_occurrence(&l, false).expect("fires");
            }
            shown = l;
        }
        fired
    }

    #[test]
    fn agrees_with_a_ticking_daemon_across_clock_changes() {
        let exprs = [
            "30 2 * * *",
            "0 * * * *",
            "*/15 * * * *",
            "30 * * * *",
            "*/7 * * * * *",
            "15,45 1-3 * * *",
            "0 30 1 * * *",
            "10 2 * * *",
            "59 1 * * *",
            "0 3 * * *",
        ];
        for (tz, edge) in EDGES {
            for expr in exprs {
                let s = sched(expr, tz);
                let (from, to) = (
                    at(edge) - TimeDelta::hours(3),
                    at(edge) + TimeDelta::hours(3),
                );
                let mut ours = Vec::new();
                let mut t = from;
                while let Some(next) = s.next_after(t).filter(|n| *n <= to) {
                    ours.push(next);
                    t = next;
                }
                let daemon = ticking_daemon(&s, from, to);
                assert_eq!(ours, daemon, "{expr} in {tz} around {edge}");
                // From any point, also inside a repeated hour, the next firing is the
                // daemon's next one.
                let mut t = from;
                while t < to {
                    if let Some(want) = daemon.iter().find(|d| **d > t) {
                        assert_eq!(s.next_after(t), Some(*want), "{expr} in {tz} after {t}");
                    }
                    t += TimeDelta::seconds(97);
                }
            }
        }
    }

    /// Croner's own answer to whether `expr`'s dates ever meet: its search, run from
    /// 2000 to its horizon (slow when they never do).
    fn croner_finds_a_date(expr: &str) -> bool {
        let cron = parser()
            .parse(expr)
            .unwrap_or_else(|e| panic!("{expr}: {e}"));
        let from = DateTime::from_timestamp(946_684_800, 0) // 2000-01-01T00:00:00
            .unwrap_or_default()
            .naive_utc();
        cron.find_next_occurrence(&from, true).is_ok()
    }

    fn meet(expr: &str) -> bool {
        let cron = parser()
            .parse(expr)
            .unwrap_or_else(|e| panic!("{expr}: {e}"));
        dates_meet(&cron.pattern)
    }

    #[test]
    fn the_28_year_walk_finds_a_date_exactly_when_croner_does() {
        // (expression, whether its dates meet)
        let cases = [
            ("0 0 30 2 *", false),
            ("0 0 29 2 *", true),
            ("0 0 31 4,6,9,11 *", false),
            ("0 0 31 4,6,9,12 *", true),
            ("0 0 L 2 *", true),
            ("0 0 LW 2 *", true),
            ("0 0 30W 2 *", false),
            ("0 0 31W 4 *", false),
            ("0 0 1W * *", true),
            // Either field may match without `+`, both must with it.
            ("0 0 30 2 MON", true),
            ("0 0 30 2 +MON", false),
            // 29 February on a Monday: every 28 years (2016, 2044).
            ("0 0 29 2 +MON", true),
            // A fifth weekday in February: only in a leap year starting that month
            // on that weekday (a fifth Sunday in 2004, a fifth Friday in 2008).
            ("0 0 ? 2 SUN#5", true),
            ("0 0 29 2 +FRI#5", true),
            ("0 0 28 2 +FRI#5", false),
            ("0 0 ? 4 FRI#5", true),
            ("0 0 ? 2 5L", true),
            ("0 0 1 * +5L", false),
            ("0 0 31 2 +5L", false),
            ("0 0 15W * +SAT", false),
            ("0 0 15W * +FRI", true),
            ("0 0 1 1 +SUN", true),
        ];
        for (expr, want) in cases {
            assert_eq!(meet(expr), want, "{expr}");
            assert_eq!(croner_finds_a_date(expr), want, "croner on {expr}");
        }
    }

    fn date_fields() -> impl proptest::strategy::Strategy<Value = String> {
        let day = proptest::prop_oneof![
            Just("*".to_string()),
            Just("L".to_string()),
            Just("LW".to_string()),
            (1u32..=31).prop_map(|d| d.to_string()),
            (1u32..=31).prop_map(|d| format!("{d}W")),
            (1u32..=31, 1u32..=31).prop_map(|(a, b)| format!("{a},{b}")),
            (1u32..=31, 1u32..=15).prop_map(|(a, step)| format!("{a}/{step}")),
        ];
        let month = proptest::prop_oneof![
            Just("*".to_string()),
            (1u32..=12).prop_map(|m| m.to_string()),
            (1u32..=12, 1u32..=12).prop_map(|(a, b)| format!("{a},{b}")),
        ];
        let weekday = proptest::prop_oneof![
            Just("*".to_string()),
            (0u32..=7).prop_map(|d| d.to_string()),
            (0u32..=6, 1u32..=5).prop_map(|(d, n)| format!("{d}#{n}")),
            (0u32..=6).prop_map(|d| format!("{d}L")),
            (0u32..=6, 0u32..=6).prop_map(|(a, b)| format!("{a},{b}")),
        ];
        (day, month, weekday, any::<bool>())
            .prop_map(|(d, m, w, and)| format!("0 0 {d} {m} {}{w}", if and { "+" } else { "" }))
    }

    use proptest::prelude::*;

    /// Levenshtein distance in full, ignoring ASCII case: what `edits_within` cuts short.
    fn edit_distance(a: &str, b: &str) -> usize {
        let (a, b) = (a.to_ascii_lowercase(), b.to_ascii_lowercase());
        let (a, b) = (a.as_bytes(), b.as_bytes());
        let mut prev: Vec<usize> = (0..=b.len()).collect();
        for (i, ca) in a.iter().enumerate() {
            let mut cur = vec![i + 1; b.len() + 1];
            for (j, cb) in b.iter().enumerate() {
                let subst = prev[j] + usize::from(ca != cb);
                cur[j + 1] = subst.min(prev[j + 1] + 1).min(cur[j] + 1);
            }
            prev = cur;
        }
        prev[b.len()]
    }

    proptest! {
        #[test]
        fn edits_within_is_the_edit_distance_when_it_is_small(
            a in "[a-dA-D/_]{0,12}",
            b in "[a-dA-D/_]{0,12}",
            max in 0usize..4,
        ) {
            let d = edit_distance(&a, &b);
            prop_assert_eq!(edits_within(&a, &b, max), (d <= max).then_some(d));
        }

        #[test]
        fn dates_meet_exactly_when_croner_finds_one(expr in date_fields()) {
            prop_assume!(parser().parse(&expr).is_ok());
            prop_assert_eq!(meet(&expr), croner_finds_a_date(&expr), "{}", expr);
        }

        #[test]
        fn next_after_is_the_first_firing_after(expr in any_schedule(), (tz, t) in any_zone_time()) {
            let s = sched(&expr, tz);
            let next = s.next_after(t).expect("fires");
            prop_assert!(next > t);
            // Nothing fires in between, and both directions agree on the slots.
            let before = s.latest_at_or_before(next - TimeDelta::nanoseconds(1));
            prop_assert!(before.is_none_or(|b| b <= t), "{before:?} between {t} and {next}");
            prop_assert_eq!(s.latest_at_or_before(next), Some(next));
            if let Some(last) = s.latest_at_or_before(t) {
                prop_assert!(last <= t);
                prop_assert_eq!(s.next_after(last), Some(next));
            }
        }

        #[test]
        fn fixed_times_agree_with_croner(expr in fixed_time(), (tz, t) in any_zone_time()) {
            // Croner applies the same rule to fixed times on its own, in the zone.
            let s = sched(&expr, tz);
            let zone: Tz = tz.parse().expect("known zone");
            let theirs = s.cron.find_next_occurrence(&t.with_timezone(&zone), false).map(|d| d.to_utc()).ok();
            prop_assert_eq!(s.next_after(t), theirs);
        }

        #[test]
        fn any_text_parses_or_errs_without_panicking(expr in "\\PC{0,40}", tz in "\\PC{0,20}") {
            let _ = Schedule::parse(&expr, Some(&tz));
        }
    }
}
