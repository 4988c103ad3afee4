//! Why a request cannot be done, in the domain's words. The HTTP layer turns these into
//! status codes; nothing here knows about HTTP.

use bramble_api::parse::ManifestError;

/// A request the cluster's current state refuses.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DomainError {
    /// Manifests that do not validate; every problem with its file, line and field.
    #[error("{}", invalid_summary(.0))]
    InvalidManifest(Vec<ManifestError>),
    /// The object does not exist.
    #[error("{kind} {name:?} not found")]
    NotFound {
        /// `service`, `node`, `task`, `cronjob`…
        kind: &'static str,
        /// Its name or id.
        name: String,
    },
    /// The state changed under the request too often, or the request contradicts it
    /// (a second manual cron run in one second).
    #[error("{0}")]
    Conflict(String),
    /// The request itself is wrong (a kind that cannot be restarted, a bad value).
    #[error("{0}")]
    BadRequest(String),
    /// The request needs something that is not there now (a node's link).
    #[error("{0}")]
    Unavailable(String),
}

impl DomainError {
    /// A not-found error.
    pub fn not_found(kind: &'static str, name: impl Into<String>) -> DomainError {
        DomainError::NotFound {
            kind,
            name: name.into(),
        }
    }
}

fn invalid_summary(details: &[ManifestError]) -> String {
    match details {
        [one] => format!("invalid manifest: {one}"),
        many => format!("invalid manifests: {} problems", many.len()),
    }
}

pub use bramble_api::error_chain as chain;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_what_is_wrong() {
        assert_eq!(
            DomainError::not_found("service", "web").to_string(),
            "service \"web\" not found"
        );
        let e = ManifestError {
            file: "a.yaml".into(),
            line: 3,
            column: 5,
            field: "spec.image".into(),
            message: "must not be empty".into(),
        };
        assert_eq!(
            DomainError::InvalidManifest(vec![e.clone()]).to_string(),
            "invalid manifest: a.yaml:3:5: spec.image: must not be empty"
        );
        assert_eq!(
            DomainError::InvalidManifest(vec![e.clone(), e]).to_string(),
            "invalid manifests: 2 problems"
        );
    }
}
