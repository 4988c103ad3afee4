//! `login URL [--as NAME]`: pins a controller's cluster CA in a context. It connects,
//! shows the fingerprint of the CA the controller's certificate chain ends with, and
//! saves it only once the user has compared it with the controller's own (printed at
//! its start; `sha256sum` of DATA_DIR/ca.crt's DER) and said yes, or when
//! `--ca-fingerprint` (or `--certificate-authority`) already names the same CA. No
//! credential is sent before the CA is pinned.

use std::io::{BufRead, IsTerminal, Write};

use anyhow::{bail, Result};

use crate::args::{Global, LoginArgs};
use crate::client::{parse_servers, pinned, probe_ca};
use crate::config::{self, ConfigFile, Trust};
use crate::error::usage;

/// Connects, shows, asks, saves.
pub async fn run(args: &LoginArgs, global: &Global, out: &mut dyn Write) -> Result<()> {
    // Several controllers of one cluster may be listed: every one must hold the same
    // CA; the first that answers is shown, and any other that answers must agree.
    let servers: Vec<String> = parse_servers(&args.server)
        .map_err(|e| usage(e.to_string()))?
        .iter()
        .map(|s| s.as_str().trim_end_matches('/').to_string())
        .collect();
    let mut answered = None;
    let mut failure = None;
    for s in &servers {
        match probe_ca(s).await {
            Ok(fp) => match &answered {
                None => answered = Some((s.clone(), fp)),
                Some((first, f)) if *f != fp => bail!(
                    "{first} and {s} hold different CAs ({} and {}): they are not one cluster; nothing saved",
                    f.short(),
                    fp.short()
                ),
                Some(_) => {}
            },
            Err(e) => failure = Some(e),
        }
    }
    let Some((server, offered)) = answered else {
        return Err(failure.map_or_else(|| anyhow::anyhow!("no controller answered"), Into::into));
    };
    let expected = match (&global.certificate_authority, &global.ca_fingerprint) {
        (Some(f), _) => Some(pinned(&Trust::File(f.clone()))?),
        (None, Some(fp)) => Some(pinned(&Trust::Fingerprint(fp.clone()))?),
        (None, None) => None,
    };
    writeln!(out, "The controller at {server} holds the cluster CA")?;
    writeln!(out, "  sha256 {offered}")?;
    match expected {
        Some(e) if e == offered => writeln!(out, "which is the CA you gave.")?,
        Some(e) => bail!(
            "the controller's CA ({}) is not the one you gave ({}): not saved, nothing sent",
            offered.short(),
            e.short()
        ),
        None => {
            let stdin = std::io::stdin();
            if !stdin.is_terminal() {
                bail!(
                    "not saved: compare the fingerprint above with the controller's, then run again with --ca-fingerprint {offered} (no terminal to ask on)"
                );
            }
            write!(
                out,
                "Compare it with the one the controller printed at its start. Trust it? [y/N] "
            )?;
            out.flush()?;
            let mut answer = String::new();
            stdin.lock().read_line(&mut answer)?;
            if !matches!(answer.trim(), "y" | "Y" | "yes" | "YES" | "Yes") {
                bail!("not saved: the CA was not trusted");
            }
        }
    }
    let path = config::path_from_env()?;
    let mut file = ConfigFile::load(&path)?;
    let name = args
        .name
        .clone()
        .or_else(|| global.context.clone())
        .or_else(|| file.current_context.clone())
        .unwrap_or_else(|| "default".to_string());
    let created = file.set_context(
        &name,
        Some(servers.join(",")),
        global.token.clone(),
        Some(offered.to_string()),
    );
    file.save(&path)?;
    let what = if created { "created" } else { "updated" };
    writeln!(
        out,
        "Context {name:?} {what} in {}: {server}, CA {}.",
        path.display(),
        offered.short()
    )?;
    if file.context(&name).is_some_and(|c| c.token.is_none()) {
        writeln!(
            out,
            "Now a token: export BRAMBLE_TOKEN=\"$(sudo cat DATA_DIR/admin-token)\" (or viewer-token), or keep it in the context with `bramblectl config set-context {name} --token …`."
        )?;
    }
    Ok(())
}
