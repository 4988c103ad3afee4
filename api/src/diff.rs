//! What an apply changes in a workload, field by field, for `apply --dry-run` and
//! `bramblectl diff`: the manifests as JSON, flattened to `spec.ports[0].host`-style
//! paths, compared leaf by leaf. Secret values never appear: a manifest holds only
//! references to them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One field that differs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FieldChange {
    /// `spec.image`, `spec.env.RPC_USER`, `spec.ports[0].host`.
    pub path: String,
    /// The value before, as JSON text; None when the field is new.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<String>,
    /// The value after; None when the field goes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
}

fn flatten(prefix: &str, v: &Value, out: &mut BTreeMap<String, String>) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, v) in m {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&p, v, out);
            }
        }
        Value::Array(a) if !a.is_empty() => {
            for (i, v) in a.iter().enumerate() {
                flatten(&format!("{prefix}[{i}]"), v, out);
            }
        }
        Value::String(s) => {
            out.insert(prefix.to_string(), s.clone());
        }
        // Empty objects and lists are the absence of the field.
        Value::Object(_) | Value::Array(_) | Value::Null => {}
        other => {
            out.insert(prefix.to_string(), other.to_string());
        }
    }
}

/// The fields that differ between `before` and `after` (anything serializable: a
/// manifest), in path order.
pub fn changes<T: Serialize>(before: &T, after: &T) -> Vec<FieldChange> {
    let (mut a, mut b) = (BTreeMap::new(), BTreeMap::new());
    if let (Ok(x), Ok(y)) = (serde_json::to_value(before), serde_json::to_value(after)) {
        flatten("", &x, &mut a);
        flatten("", &y, &mut b);
    }
    let mut paths: Vec<&String> = a.keys().chain(b.keys()).collect();
    paths.sort();
    paths.dedup();
    paths
        .into_iter()
        .filter(|p| a.get(*p) != b.get(*p))
        .map(|p| FieldChange {
            path: p.clone(),
            before: a.get(p).cloned(),
            after: b.get(p).cloned(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse::parse_manifests;

    fn manifest(yaml: &str) -> crate::manifest::Manifest {
        parse_manifests("t.yaml", yaml).expect("valid").workloads[0]
            .manifest
            .clone()
    }

    #[test]
    fn changed_added_and_removed_fields_are_listed_by_path() {
        let a = manifest("apiVersion: bramble/v1\nkind: Service\nmetadata: {name: web, labels: {app: web}}\nspec:\n  image: a:1\n  replicas: 2\n  env: {A: '1', B: '2'}\n  ports: [{container: 80, host: 8080}]\n");
        let b = manifest("apiVersion: bramble/v1\nkind: Service\nmetadata: {name: web, labels: {app: web}}\nspec:\n  image: a:2\n  replicas: 2\n  env: {A: '1', C: '3'}\n  ports: [{container: 80, host: 9090}]\n");
        let c = changes(&a, &b);
        let shown: Vec<(&str, Option<&str>, Option<&str>)> = c
            .iter()
            .map(|c| (c.path.as_str(), c.before.as_deref(), c.after.as_deref()))
            .collect();
        assert_eq!(
            shown,
            vec![
                ("spec.env.B", Some("2"), None),
                ("spec.env.C", None, Some("3")),
                ("spec.image", Some("a:1"), Some("a:2")),
                ("spec.ports[0].host", Some("8080"), Some("9090")),
            ]
        );
        assert!(changes(&a, &a).is_empty());
    }

    #[test]
    fn a_secret_reference_shows_its_name_and_key_only() {
        let a = manifest("apiVersion: bramble/v1\nkind: Wallet\nmetadata: {name: w}\nspec:\n  image: a:1\n  env: {PW: {secret: rpc, key: password}}\n");
        let b = manifest("apiVersion: bramble/v1\nkind: Wallet\nmetadata: {name: w}\nspec:\n  image: a:1\n  env: {PW: {secret: rpc2, key: password}}\n");
        let c = changes(&a, &b);
        assert_eq!(c.len(), 1, "{c:?}");
        assert_eq!(c[0].path, "spec.env.PW.secret");
        assert_eq!(
            (c[0].before.as_deref(), c[0].after.as_deref()),
            (Some("rpc"), Some("rpc2"))
        );
    }
}
