//! How a failed command ends: the message on stderr and the exit code.
//!
//! | code | when |
//! | --- | --- |
//! | 0 | success, also when stdout is closed early (`bramblectl logs x \| head`) |
//! | 1 | the request failed, the server said no, a config or file problem |
//! | 2 | the command line is wrong (clap's own code for usage errors) |
//! | 3 | a manifest is invalid, found locally or by the server |

use std::io::{self, Write};

use bramble_api::parse::ManifestError;

use crate::client;

/// Exit code for request, server and file errors.
pub const EXIT_FAILURE: u8 = 1;
/// Exit code for command-line errors.
pub const EXIT_USAGE: u8 = 2;
/// Exit code for invalid manifests.
pub const EXIT_INVALID: u8 = 3;

/// Failures that end with a particular exit code.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// The command line asks for something impossible.
    #[error("{0}")]
    Usage(String),
    /// Manifests were invalid; nothing was sent to the server.
    #[error("{} in the manifests; nothing was {action}", problems(errors.len()))]
    Invalid {
        /// Every problem.
        errors: Vec<ManifestError>,
        /// `applied`, `deleted`.
        action: &'static str,
    },
    /// The command has already said what went wrong on stderr.
    #[error("failed (exit code {0})")]
    Reported(u8),
}

fn problems(n: usize) -> String {
    if n == 1 {
        "1 problem".into()
    } else {
        format!("{n} problems")
    }
}

/// A usage error (exit code 2).
pub fn usage(message: impl Into<String>) -> anyhow::Error {
    Failure::Usage(message.into()).into()
}

fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|e| {
        e.downcast_ref::<io::Error>()
            .is_some_and(|io| io.kind() == io::ErrorKind::BrokenPipe)
    })
}

/// Writes what went wrong to `stderr` and returns the exit code.
pub fn report(err: &anyhow::Error, stderr: &mut dyn Write) -> u8 {
    if is_broken_pipe(err) {
        // Whoever read our output has seen enough (`| head`): not an error.
        return 0;
    }
    let (code, details): (u8, &[ManifestError]) = match err.downcast_ref() {
        Some(Failure::Reported(code)) => return *code,
        Some(Failure::Usage(_)) => (EXIT_USAGE, &[]),
        Some(Failure::Invalid { errors, .. }) => (EXIT_INVALID, errors),
        None => match err.downcast_ref::<client::Error>() {
            Some(client::Error::Api { body, .. }) if !body.details.is_empty() => {
                (EXIT_INVALID, &body.details)
            }
            _ => (EXIT_FAILURE, &[]),
        },
    };
    // Nothing more can be done if stderr itself is gone.
    for d in details {
        let _ = writeln!(stderr, "{d}");
    }
    let _ = writeln!(stderr, "error: {err:#}");
    code
}

#[cfg(test)]
mod tests {
    use super::*;
    use bramble_api::rest::ApiErrorBody;
    use reqwest::StatusCode;

    fn manifest_error() -> ManifestError {
        ManifestError {
            file: "w.yaml".into(),
            line: 7,
            column: 9,
            field: "spec.resources.cpu".into(),
            message: "invalid cpu quantity \"lots\"".into(),
        }
    }

    fn reported(err: anyhow::Error) -> (u8, String) {
        let mut buf = Vec::new();
        let code = report(&err, &mut buf);
        (code, String::from_utf8(buf).expect("utf-8"))
    }

    #[test]
    fn local_manifest_errors_exit_3_with_one_line_each() {
        let (code, text) = reported(
            Failure::Invalid {
                errors: vec![manifest_error()],
                action: "applied",
            }
            .into(),
        );
        assert_eq!(code, EXIT_INVALID);
        assert_eq!(
            text,
            "w.yaml:7:9: spec.resources.cpu: invalid cpu quantity \"lots\"\n\
             error: 1 problem in the manifests; nothing was applied\n"
        );
    }

    #[test]
    fn server_side_manifest_errors_exit_3_too() {
        let err = client::Error::Api {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            body: ApiErrorBody {
                code: "invalid_manifest".into(),
                message: "invalid manifests: 1 problems".into(),
                details: vec![manifest_error()],
            },
        };
        let (code, text) = reported(err.into());
        assert_eq!(code, EXIT_INVALID);
        assert!(
            text.starts_with("w.yaml:7:9: spec.resources.cpu: "),
            "{text}"
        );
    }

    #[test]
    fn other_errors_are_one_line_with_exit_1_and_usage_errors_exit_2() {
        let (code, text) = reported(client::Error::Unauthorized.into());
        assert_eq!(code, EXIT_FAILURE);
        assert_eq!(
            text,
            "error: unauthorized: the server rejected the token (set --token, BRAMBLE_TOKEN or a context)\n"
        );
        let (code, text) = reported(usage("name the kind"));
        assert_eq!(
            (code, text.as_str()),
            (EXIT_USAGE, "error: name the kind\n")
        );
        let (code, text) = reported(Failure::Reported(1).into());
        assert_eq!((code, text.as_str()), (1, ""));
    }

    #[test]
    fn a_closed_stdout_is_not_an_error() {
        let err = anyhow::Error::from(io::Error::from(io::ErrorKind::BrokenPipe));
        assert_eq!(reported(err), (0, String::new()));
    }
}
