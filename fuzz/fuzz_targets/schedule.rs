//! Cron schedules with an optional time zone (the first line is the expression, the
//! second the zone); a schedule that parses is asked for its next firings, which must
//! end, whatever the expression.
#![no_main]

use bramble_api::schedule::Schedule;
use chrono::{TimeZone, Utc};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (expr, tz) = match text.split_once('\n') {
        Some((e, z)) => (e, Some(z)),
        None => (text, None),
    };
    if let Ok(s) = Schedule::parse(expr, tz) {
        let Some(mut t) = Utc.with_ymd_and_hms(2026, 12, 1, 0, 0, 0).single() else {
            return;
        };
        for _ in 0..3 {
            match s.next_after(t) {
                Some(n) => {
                    assert!(n > t, "the next firing of {expr:?} is after {t}");
                    t = n;
                }
                None => break,
            }
        }
        let _ = s.latest_at_or_before(t);
    }
});
