//! `apply -f FILE|DIR|-`.

use std::io::Write;

use anyhow::{bail, Result};
use bramble_api::parse::parse_sources;
use bramble_api::rest::{ApplyRequest, ApplyResult};

use crate::args::ApplyArgs;
use crate::client::Client;
use crate::error::Failure;
use crate::output::object_ref;
use crate::sources;

/// Reads and validates the manifests locally, then sends them in one request (the
/// controller applies all or nothing). `verb` names the command in messages.
async fn send(
    client: &Client,
    manifests: &crate::args::ManifestFiles,
    dry_run: bool,
    (verb, done): (&str, &'static str),
) -> Result<bramble_api::rest::ApplyResponse> {
    let sources = sources::read(&manifests.files, &mut std::io::stdin().lock())?;
    let docs = parse_sources(&sources).map_err(|errors| Failure::Invalid {
        errors,
        action: done,
    })?;
    if docs.is_empty() {
        bail!("no objects passed to {verb}: the files hold no manifests");
    }
    Ok(client.apply(&ApplyRequest { sources, dry_run }).await?)
}

/// Validates locally, then sends everything in one request: the controller applies all
/// or nothing.
pub async fn run(client: &Client, args: &ApplyArgs, out: &mut dyn Write) -> Result<()> {
    let resp = send(client, &args.manifests, args.dry_run, ("apply", "applied")).await?;
    let suffix = if args.dry_run { " (dry run)" } else { "" };
    for r in &resp.secrets {
        writeln!(out, "secret/{} {}{suffix}", r.name, r.outcome)?;
    }
    for r in &resp.results {
        write!(out, "{} {}{suffix}", object_ref(r.kind, &r.name), r.outcome)?;
        // A new workload's tasks go without saying, but not in a dry run.
        let said = args.dry_run || r.outcome == bramble_api::rest::ApplyOutcome::Configured;
        match effects(r).filter(|_| said) {
            Some(e) => writeln!(out, ": {e}")?,
            None => writeln!(out)?,
        }
        if args.dry_run {
            for c in &r.changes {
                writeln!(out, "  {}", change_line(c))?;
            }
        }
    }
    Ok(())
}

/// What an apply does to a workload's tasks, in words: `replaces 2 tasks (web-…-0,
/// web-…-1), adds 1`; None when it touches none.
pub fn effects(r: &ApplyResult) -> Option<String> {
    let mut parts = Vec::new();
    let list = |ids: &[String]| ids.join(", ");
    match r.replaced.len() {
        0 => {}
        1 => parts.push(format!("replaces 1 task ({})", list(&r.replaced))),
        n => parts.push(format!("replaces {n} tasks ({})", list(&r.replaced))),
    }
    match r.added {
        0 => {}
        1 => parts.push("adds 1 task".to_string()),
        n => parts.push(format!("adds {n} tasks")),
    }
    match r.removed.len() {
        0 => {}
        1 => parts.push(format!("removes 1 task ({})", list(&r.removed))),
        n => parts.push(format!("removes {n} tasks ({})", list(&r.removed))),
    }
    if parts.is_empty() && r.outcome == bramble_api::rest::ApplyOutcome::Configured {
        parts.push("no task replaced".to_string());
    }
    if parts.is_empty() {
        return None;
    }
    let mut text = parts.join(", ");
    if let Some(note) = &r.note {
        text.push_str(&format!(" ({note})"));
    }
    Some(text)
}

/// `spec.image: a:1 -> a:2`, `+ spec.env.C: 3`, `- spec.env.B: 2`.
pub fn change_line(c: &bramble_api::diff::FieldChange) -> String {
    match (&c.before, &c.after) {
        (Some(b), Some(a)) => format!("~ {}: {b} -> {a}", c.path),
        (None, Some(a)) => format!("+ {}: {a}", c.path),
        (Some(b), None) => format!("- {}: {b}", c.path),
        (None, None) => format!("~ {}", c.path),
    }
}

/// `diff -f`: what `apply -f` would change, asked of the controller as a dry run. Exits
/// 1 when something would change (as `kubectl diff`), 0 when nothing would.
pub async fn diff(
    client: &Client,
    args: &crate::args::DiffArgs,
    out: &mut dyn Write,
) -> Result<()> {
    let resp = send(client, &args.manifests, true, ("diff", "compared")).await?;
    let mut differs = false;
    for r in &resp.secrets {
        if r.outcome != bramble_api::rest::ApplyOutcome::Unchanged {
            differs = true;
            // Values are never shown: only that the Secret changes.
            writeln!(out, "secret/{} would be {}", r.name, r.outcome)?;
        }
    }
    for r in &resp.results {
        if r.outcome == bramble_api::rest::ApplyOutcome::Unchanged {
            continue;
        }
        differs = true;
        let what = object_ref(r.kind, &r.name);
        match effects(r) {
            Some(e) => writeln!(out, "{what} would be {}: {e}", r.outcome)?,
            None => writeln!(out, "{what} would be {}", r.outcome)?,
        }
        for c in &r.changes {
            writeln!(out, "  {}", change_line(c))?;
        }
    }
    if differs {
        out.flush()?;
        return Err(Failure::Reported(crate::error::EXIT_FAILURE).into());
    }
    Ok(())
}
