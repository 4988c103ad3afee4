//! `-l/--selector`: kubectl's equality-based label selectors, `app=web,tier!=cache`,
//! plus `key` (the label is set) and `!key` (it is not).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

/// One requirement.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    Absent(String),
}

/// A parsed selector: every requirement must hold.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Selector(Vec<Requirement>);

/// A selector that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid selector {selector:?}: {reason}")]
pub struct BadSelector {
    /// As given.
    pub selector: String,
    /// What is wrong.
    pub reason: String,
}

fn key(k: &str, whole: &str) -> Result<String, BadSelector> {
    let k = k.trim();
    let ok = !k.is_empty()
        && k.len() <= 253
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'));
    if ok {
        Ok(k.to_string())
    } else {
        Err(BadSelector {
            selector: whole.to_string(),
            reason: format!("{k:?} is not a label key (letters, digits, - _ . /)"),
        })
    }
}

impl FromStr for Selector {
    type Err = BadSelector;
    fn from_str(s: &str) -> Result<Selector, BadSelector> {
        let mut reqs = Vec::new();
        for part in s.split(',').map(str::trim) {
            if part.is_empty() {
                return Err(BadSelector {
                    selector: s.to_string(),
                    reason: "an empty requirement (two commas, or one at an end)".into(),
                });
            }
            let req = if let Some((k, v)) = part.split_once("!=") {
                Requirement::NotEquals(key(k, s)?, v.trim().to_string())
            } else if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
                Requirement::Equals(key(k, s)?, v.trim().to_string())
            } else if let Some(k) = part.strip_prefix('!') {
                Requirement::Absent(key(k, s)?)
            } else if part.contains([' ', '(', ')']) {
                return Err(BadSelector {
                    selector: s.to_string(),
                    reason: format!("{part:?}: only =, == and != are supported (no in/notin)"),
                });
            } else {
                Requirement::Exists(key(part, s)?)
            };
            reqs.push(req);
        }
        Ok(Selector(reqs))
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .0
            .iter()
            .map(|r| match r {
                Requirement::Equals(k, v) => format!("{k}={v}"),
                Requirement::NotEquals(k, v) => format!("{k}!={v}"),
                Requirement::Exists(k) => k.clone(),
                Requirement::Absent(k) => format!("!{k}"),
            })
            .collect();
        f.write_str(&parts.join(","))
    }
}

impl Selector {
    /// Whether `labels` satisfy every requirement. As kubectl, `k!=v` holds when the
    /// label is absent.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.iter().all(|r| match r {
            Requirement::Equals(k, v) => labels.get(k) == Some(v),
            Requirement::NotEquals(k, v) => labels.get(k) != Some(v),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::Absent(k) => !labels.contains_key(k),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn selectors_match_like_kubectl() {
        let web = labels(&[("app", "web"), ("tier", "front")]);
        let db = labels(&[("app", "db")]);
        let none = labels(&[]);
        for (sel, want) in [
            ("app=web", [true, false, false]),
            ("app==web", [true, false, false]),
            ("app!=web", [false, true, true]),
            ("app=web,tier=front", [true, false, false]),
            ("app=web,tier!=front", [false, false, false]),
            ("tier", [true, false, false]),
            ("!tier", [false, true, true]),
            (" app = db ", [false, true, false]),
        ] {
            let s: Selector = sel.parse().expect(sel);
            assert_eq!(
                [s.matches(&web), s.matches(&db), s.matches(&none)],
                want,
                "{sel}"
            );
        }
        assert_eq!(
            "app=web,tier!=x,!old"
                .parse::<Selector>()
                .map(|s| s.to_string())
                .ok()
                .as_deref(),
            Some("app=web,tier!=x,!old")
        );
    }

    #[test]
    fn bad_selectors_are_refused_with_the_reason() {
        for (sel, want) in [
            ("app=web,", "an empty requirement"),
            ("", "an empty requirement"),
            ("app in (a,b)", "only =, == and != are supported"),
            ("=web", "is not a label key"),
            ("a pp=web", "is not a label key"),
        ] {
            let err = sel.parse::<Selector>().expect_err(sel);
            assert!(err.to_string().contains(want), "{sel}: {err}");
        }
    }
}
