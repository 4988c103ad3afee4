//! Secrets: what apply and delete decide about them, which values a node is sent, and
//! how a workload's spec hash follows the Secrets it references.
//!
//! Values are sealed (encrypted) by a [`Sealer`] before they are stored and opened only
//! to compare them on apply and to send them to the node that runs a task; the core
//! never sees the key. A Secret referenced by a workload cannot be deleted, nor lose a
//! referenced key, and a workload cannot reference a Secret or key that does not exist:
//! a reference that resolves at apply resolves for as long as it is stored.

use std::collections::BTreeMap;

use bramble_api::manifest::{Manifest, SecretManifest, SecretRef};
use bramble_api::task::{fnv1a64, Task, TaskSpec};
use bramble_api::token::Secret;
use chrono::{DateTime, Utc};

use super::error::DomainError;
use super::model::{Sealed, StoredSecret, StoredWorkload};
use super::snapshot::Snapshot;

/// Seals and opens values. Each value is bound to its Secret and key, so a sealed value
/// moved to another key in the store does not open.
pub trait Sealer {
    /// Encrypts `value`, the value of `key` in Secret `secret`; `None` only if the
    /// system's random generator fails.
    fn seal(&self, secret: &str, key: &str, value: &Secret) -> Option<Sealed>;
    /// Decrypts a value sealed for `secret`/`key`; `None` if it does not open (another
    /// key, tampered with, or moved).
    fn open(&self, secret: &str, key: &str, sealed: &Sealed) -> Option<Secret>;
}

/// The outcome of applying one Secret manifest.
#[derive(Debug, Clone, PartialEq)]
pub enum SecretApply {
    /// Same keys, values and labels as stored.
    Unchanged,
    /// New or changed: the record to store.
    Store(Box<StoredSecret>),
}

/// Compares a Secret manifest with what is stored, opening the stored values, and
/// seals a new record if anything differs.
pub fn apply_secret(
    existing: Option<&StoredSecret>,
    m: &SecretManifest,
    sealer: &dyn Sealer,
    now: DateTime<Utc>,
) -> Result<SecretApply, DomainError> {
    let name = m.metadata.name.as_str();
    if let Some(old) = existing {
        let same = old.labels == m.metadata.labels
            && old.data.len() == m.data.len()
            && m.data.iter().all(|(k, v)| {
                old.data
                    .get(k)
                    .and_then(|s| sealer.open(name, k, s))
                    .is_some_and(|o| o == *v)
            });
        if same {
            return Ok(SecretApply::Unchanged);
        }
    }
    let data = m
        .data
        .iter()
        .map(|(k, v)| Some((k.clone(), sealer.seal(name, k, v)?)))
        .collect::<Option<_>>()
        .ok_or_else(|| {
            DomainError::Unavailable(
                "the system's random number generator failed; nothing was stored".into(),
            )
        })?;
    Ok(SecretApply::Store(Box::new(StoredSecret {
        name: name.to_string(),
        labels: m.metadata.labels.clone(),
        data,
        generation: existing.map_or(1, |o| o.generation + 1),
        created_at: existing.map_or(now, |o| o.created_at),
        updated_at: now,
    })))
}

/// The spec hash of a workload: its container spec's, and for a workload with Secret
/// references, the versions of those Secrets too, so a changed value replaces its tasks
/// (as any other change of what they run does).
pub fn spec_hash(m: &Manifest, secrets: &BTreeMap<String, StoredSecret>) -> String {
    let spec = TaskSpec::from_manifest(m);
    let base = spec.hash();
    let mut versions: Vec<String> = spec
        .secret_refs()
        .filter_map(|(_, r)| secrets.get(r.secret.as_str()).map(StoredSecret::version))
        .collect();
    if versions.is_empty() {
        return base;
    }
    versions.sort();
    versions.dedup();
    let text = format!("{base}\n{}", versions.join("\n"));
    format!("{:016x}", fnv1a64(text.as_bytes()))
}

/// A workload's reference that does not resolve: the variable and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dangling {
    /// The variable (`RPC_PASSWORD`).
    pub var: String,
    /// The reference.
    pub reference: SecretRef,
    /// Whether the Secret exists (and only the key is missing).
    pub secret_exists: bool,
}

impl Dangling {
    /// For people: which Secret or key is missing.
    pub fn message(&self) -> String {
        let r = &self.reference;
        if self.secret_exists {
            format!("Secret {:?} has no key {:?}", r.secret.as_str(), r.key)
        } else {
            format!(
                "no Secret {:?} (apply it first, or in the same apply)",
                r.secret.as_str()
            )
        }
    }
}

/// The references of `m` that do not resolve among `secrets` (name → keys).
pub fn dangling(m: &Manifest, secrets: &BTreeMap<&str, Vec<&str>>) -> Vec<Dangling> {
    m.spec
        .env
        .iter()
        .filter_map(|(var, v)| {
            let r = v.secret_ref()?;
            let keys = secrets.get(r.secret.as_str());
            if keys.is_some_and(|k| k.contains(&r.key.as_str())) {
                return None;
            }
            Some(Dangling {
                var: var.clone(),
                reference: r.clone(),
                secret_exists: keys.is_some(),
            })
        })
        .collect()
}

/// The workloads (`kind/name`) whose env references Secret `name`.
pub fn used_by(snap: &Snapshot, name: &str) -> Vec<String> {
    snap.workloads
        .values()
        .filter(|w| references(&w.value, name))
        .map(|w| format!("{}/{}", w.value.kind().path(), w.value.name()))
        .collect()
}

/// Whether a workload references Secret `name`.
pub fn references(w: &StoredWorkload, name: &str) -> bool {
    w.manifest
        .spec
        .env
        .values()
        .filter_map(|v| v.secret_ref())
        .any(|r| r.secret.as_str() == name)
}

/// The values of a task's references, by variable, for the node that runs it. A
/// reference that does not resolve (or a value that does not open) is left out: the
/// agent then refuses the task with the variable's name, rather than start it with a
/// missing password.
pub fn resolve(snap: &Snapshot, task: &Task, sealer: &dyn Sealer) -> BTreeMap<String, Secret> {
    task.spec
        .secret_refs()
        .filter_map(|(var, r)| {
            let s = snap.secrets.get(r.secret.as_str())?;
            let sealed = s.value.data.get(&r.key)?;
            let value = sealer.open(r.secret.as_str(), &r.key, sealed)?;
            Some((var.to_string(), value))
        })
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use bramble_api::parse::parse_manifests;

    /// Reverses and tags values: enough to tell sealed from plain and to bind a value to
    /// its place, which is all these decisions rely on. The real cipher is tested in
    /// `state::vault`.
    pub(crate) struct Mirror;

    impl Sealer for Mirror {
        fn seal(&self, secret: &str, key: &str, value: &Secret) -> Option<Sealed> {
            Some(Sealed(format!(
                "{secret}/{key}/{}",
                value.0.chars().rev().collect::<String>()
            )))
        }
        fn open(&self, secret: &str, key: &str, sealed: &Sealed) -> Option<Secret> {
            let rest = sealed.0.strip_prefix(&format!("{secret}/{key}/"))?;
            Some(Secret(rest.chars().rev().collect()))
        }
    }

    fn secret(text: &str) -> SecretManifest {
        let mut p = parse_manifests("s.yaml", text).expect("valid");
        p.secrets.remove(0).secret
    }

    const RPC: &str = "apiVersion: bramble/v1\nkind: Secret\nmetadata: {name: ltc-rpc}\ndata: {password: hunter2, user: pool}\n";
    const WALLET: &str = "apiVersion: bramble/v1\nkind: Wallet\nmetadata: {name: ltc}\nspec:\n  image: w:1\n  env:\n    RPC_USER: pool\n    RPC_PASSWORD: {secret: ltc-rpc, key: password}\n";

    fn now() -> DateTime<Utc> {
        "2026-12-01T12:00:00Z".parse().expect("time")
    }

    #[test]
    fn a_new_secret_is_sealed_and_an_equal_one_is_unchanged() {
        let m = secret(RPC);
        let SecretApply::Store(s) = apply_secret(None, &m, &Mirror, now()).expect("sealed") else {
            panic!("stored")
        };
        assert_eq!(s.generation, 1);
        assert!(s.data.values().all(|v| !v.0.ends_with("hunter2")));
        assert_eq!(
            Mirror.open("ltc-rpc", "password", &s.data["password"]),
            Some(Secret("hunter2".into()))
        );
        assert_eq!(
            apply_secret(Some(&s), &m, &Mirror, now()).expect("sealed"),
            SecretApply::Unchanged
        );
        // A value, a key or a label changed: stored anew, one generation up.
        for changed in [
            RPC.replace("hunter2", "hunter3"),
            RPC.replace(", user: pool", ""),
            RPC.replace("ltc-rpc}", "ltc-rpc, labels: {a: b}}"),
        ] {
            let SecretApply::Store(n) =
                apply_secret(Some(&s), &secret(&changed), &Mirror, now()).expect("sealed")
            else {
                panic!("changed: {changed}")
            };
            assert_eq!(n.generation, 2);
            assert_eq!(n.created_at, s.created_at);
            assert_ne!(n.version(), s.version());
        }
    }

    #[test]
    fn a_value_that_does_not_open_counts_as_changed() {
        let m = secret(RPC);
        let SecretApply::Store(mut s) = apply_secret(None, &m, &Mirror, now()).expect("sealed")
        else {
            panic!("stored")
        };
        // Sealed for another key: moved in the store, or tampered with.
        s.data.insert("password".into(), s.data["user"].clone());
        assert!(matches!(
            apply_secret(Some(&s), &m, &Mirror, now()).expect("sealed"),
            SecretApply::Store(_)
        ));
    }

    #[test]
    fn the_spec_hash_follows_referenced_secrets_only() {
        let wallet = parse_manifests("w.yaml", WALLET).expect("valid").workloads[0]
            .manifest
            .clone();
        let plain = parse_manifests(
            "w.yaml",
            &WALLET.replace("{secret: ltc-rpc, key: password}", "x"),
        )
        .expect("valid")
        .workloads[0]
            .manifest
            .clone();
        let SecretApply::Store(v1) =
            apply_secret(None, &secret(RPC), &Mirror, now()).expect("sealed")
        else {
            panic!()
        };
        let SecretApply::Store(v2) = apply_secret(
            Some(&v1),
            &secret(&RPC.replace("hunter2", "x")),
            &Mirror,
            now(),
        )
        .expect("sealed") else {
            panic!()
        };
        let with = |s: &StoredSecret| BTreeMap::from([(s.name.clone(), s.clone())]);
        let h1 = spec_hash(&wallet, &with(&v1));
        assert_ne!(h1, spec_hash(&wallet, &with(&v2)));
        assert_eq!(h1, spec_hash(&wallet, &with(&v1)));
        // Without references the hash is the spec's, as before Secrets existed.
        assert_eq!(
            spec_hash(&plain, &with(&v2)),
            TaskSpec::from_manifest(&plain).hash()
        );
    }

    #[test]
    fn dangling_references_name_what_is_missing() {
        let wallet = parse_manifests("w.yaml", WALLET).expect("valid").workloads[0]
            .manifest
            .clone();
        let none = BTreeMap::new();
        let d = dangling(&wallet, &none);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].var, "RPC_PASSWORD");
        assert!(
            d[0].message().contains("no Secret \"ltc-rpc\""),
            "{}",
            d[0].message()
        );
        let no_key = BTreeMap::from([("ltc-rpc", vec!["user"])]);
        let d = dangling(&wallet, &no_key);
        assert!(
            d[0].message().contains("has no key \"password\""),
            "{}",
            d[0].message()
        );
        let ok = BTreeMap::from([("ltc-rpc", vec!["user", "password"])]);
        assert!(dangling(&wallet, &ok).is_empty());
    }
}
