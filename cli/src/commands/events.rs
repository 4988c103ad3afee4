//! `events [--watch] [--for OBJECT] [-o json|yaml]`.

use std::io::Write;

use anyhow::Result;
use bramble_api::rest::Event;
use chrono::{DateTime, Utc};

use crate::args::{EventsArgs, RawFormat};
use crate::client::Client;
use crate::describe::severity;
use crate::output::{age, write_structured, Format, ObjectRef};
use crate::table::{cell, Table};

/// Lists events oldest first, or with `--watch` prints them as they come.
pub async fn run(client: &Client, args: &EventsArgs, out: &mut dyn Write) -> Result<()> {
    let object = args.object.as_ref();
    let query = object.map(ObjectRef::to_string);
    let wanted = |e: &Event| object.is_none_or(|o| o.matches(&e.object));
    if args.watch {
        let mut stream = client.watch_events(query.as_deref()).await?;
        if args.output.is_none() {
            writeln!(out, "{}", watch_header())?;
            out.flush()?;
        }
        while let Some(e) = stream.next().await? {
            if !wanted(&e) {
                continue;
            }
            match args.output {
                None => writeln!(out, "{}", watch_row(&e, Utc::now()))?,
                // One object a line, so the stream can be read line by line (jq, grep).
                Some(RawFormat::Json) => {
                    serde_json::to_writer(&mut *out, &e)?;
                    writeln!(out)?;
                }
                Some(RawFormat::Yaml) => {
                    writeln!(out, "---")?;
                    write_structured(out, Format::Yaml, &e)?;
                }
            }
            out.flush()?;
        }
        return Ok(());
    }
    let mut events = client.events(query.as_deref()).await?;
    events.retain(wanted);
    sort(&mut events);
    match args.output {
        Some(f) => write_structured(out, f.into(), &events),
        None if events.is_empty() => {
            let _ = writeln!(std::io::stderr(), "No events found.");
            Ok(())
        }
        None => {
            write!(out, "{}", table(&events, Utc::now()))?;
            Ok(())
        }
    }
}

/// Oldest first, as kubectl lists them.
pub fn sort(events: &mut [Event]) {
    events.sort_by_key(|e| (e.at, e.seq));
}

/// `events`: LAST SEEN, TYPE, REASON, OBJECT, MESSAGE.
pub fn table(events: &[Event], now: DateTime<Utc>) -> Table {
    let mut t = Table::new(["LAST SEEN", "TYPE", "REASON", "OBJECT", "MESSAGE"]);
    for e in events {
        t.row([
            age(e.at, now),
            severity(e.severity).to_string(),
            e.reason.clone(),
            e.object.clone(),
            cell(&e.message),
        ]);
    }
    t
}

/// Column widths of streamed rows, which cannot be aligned on what is still to come:
/// wide enough for most ages, both types, most reasons and objects; a longer cell pushes
/// the rest of its row right but keeps the gap.
const WATCH_WIDTHS: [usize; 4] = [9, 7, 14, 28];
const GAP: &str = "   ";

fn fixed(cells: [&str; 5]) -> String {
    let mut line = String::new();
    for (c, w) in cells.iter().zip(WATCH_WIDTHS) {
        line.push_str(&format!("{c:<w$}{GAP}"));
    }
    line.push_str(cells[4]);
    line.trim_end().to_string()
}

/// The header of `events --watch`.
pub fn watch_header() -> String {
    fixed(["LAST SEEN", "TYPE", "REASON", "OBJECT", "MESSAGE"])
}

/// One row of `events --watch`.
pub fn watch_row(e: &Event, now: DateTime<Utc>) -> String {
    fixed([
        &age(e.at, now),
        severity(e.severity),
        &e.reason,
        &e.object,
        &cell(&e.message),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::describe::fixtures::{event, now};

    fn events() -> Vec<Event> {
        vec![
            event(
                7,
                "2026-11-10T11:59:30Z",
                true,
                "task/web-1a2b3c-0",
                "ProbeFailed",
                "liveness: http-get :80/healthz\nanswered 500",
            ),
            event(
                2,
                "2026-11-10T09:00:00Z",
                false,
                "node/pi-1",
                "NodeBack",
                "heartbeats again",
            ),
        ]
    }

    #[test]
    fn the_table_lists_events_oldest_first() {
        let mut ev = events();
        sort(&mut ev);
        assert_eq!(
            table(&ev, now()).to_string(),
            "LAST SEEN   TYPE      REASON        OBJECT              MESSAGE\n\
             3h          Normal    NodeBack      node/pi-1           heartbeats again\n\
             30s         Warning   ProbeFailed   task/web-1a2b3c-0   liveness: http-get :80/healthz answered 500\n"
        );
    }

    #[test]
    fn watched_rows_have_fixed_columns() {
        let ev = events();
        assert_eq!(
            watch_header(),
            "LAST SEEN   TYPE      REASON           OBJECT                         MESSAGE"
        );
        assert_eq!(
            watch_row(&ev[1], now()),
            "3h          Normal    NodeBack         node/pi-1                      heartbeats again"
        );
        let long = event(
            8,
            "2026-11-10T12:00:00Z",
            false,
            "task/a-very-long-workload-name-0a1b2c-0",
            "Scheduled",
            "",
        );
        assert_eq!(
            watch_row(&long, now()),
            "0s          Normal    Scheduled        task/a-very-long-workload-name-0a1b2c-0"
        );
    }
}
