//! How Bramble's binaries log: `tracing` to standard output, filtered by `BRAMBLE_LOG`
//! (default `info`); in colour only on a terminal, and never with `NO_COLOR` set, so a
//! log written to a file or a pipe holds no escape codes; one JSON object per line with
//! `BRAMBLE_LOG_FORMAT=json`, for log shippers.

use std::io::IsTerminal;

/// The log format `BRAMBLE_LOG_FORMAT` asks for (unset: text).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Lines for people.
    Text,
    /// One JSON object per line.
    Json,
}

/// Reads a `BRAMBLE_LOG_FORMAT` value. Pure.
pub fn format(value: Option<&str>) -> Result<Format, String> {
    match value {
        None | Some("") | Some("text") => Ok(Format::Text),
        Some("json") => Ok(Format::Json),
        Some(other) => Err(format!(
            "BRAMBLE_LOG_FORMAT={other:?}: expected text or json"
        )),
    }
}

/// Installs the subscriber; an unusable `BRAMBLE_LOG_FORMAT` is an error for the
/// caller to print.
pub fn init() -> Result<(), String> {
    let format = format(std::env::var("BRAMBLE_LOG_FORMAT").ok().as_deref())?;
    let filter = tracing_subscriber::EnvFilter::try_from_env("BRAMBLE_LOG")
        .unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        Format::Json => builder.json().init(),
        Format::Text => {
            let colour = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
            builder.with_ansi(colour).init()
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_are_text_json_or_an_error_naming_the_variable() {
        assert_eq!(format(None), Ok(Format::Text));
        assert_eq!(format(Some("text")), Ok(Format::Text));
        assert_eq!(format(Some("json")), Ok(Format::Json));
        let e = format(Some("JSON!")).expect_err("refused");
        assert!(
            e.contains("BRAMBLE_LOG_FORMAT") && e.contains("text or json"),
            "{e}"
        );
    }
}
