//! Names that follow workloads: every workload has a stable address from one range
//! (allocated once by the controller, never changed while the workload exists), and
//! every agent serves each address with a userspace proxy to the workload's Ready
//! instances, wherever they run. Inside containers, `NAME` and `NAME.bramble` resolve
//! to that address through the agent's resolver.
//!
//! This module is the vocabulary both sides share: the range, the table the leader
//! sends to every agent, and how a name is looked up in it. Pure.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::manifest::Kind;

/// The addresses workloads get unless the controller is told otherwise: link-local
/// (never routed off a machine), so they clash with no LAN. The first address of the
/// range is the agents' resolver.
pub const DEFAULT_RANGE: AddressRange = AddressRange {
    base: Ipv4Addr::new(169, 254, 100, 0),
    prefix: 22,
};

/// The search domain: `NAME.bramble` is `NAME`.
pub const DOMAIN: &str = "bramble";

/// The agent-to-agent port (one per node, mutual TLS with the nodes' certificates).
pub const MESH_PORT: u16 = 7947;

/// A block of IPv4 addresses, `BASE/PREFIX`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AddressRange {
    /// The first address (host bits zero).
    pub base: Ipv4Addr,
    /// Prefix length, 8 to 29.
    pub prefix: u8,
}

impl AddressRange {
    /// How many addresses the range holds.
    pub fn len(&self) -> u32 {
        1u32 << (32 - u32::from(self.prefix))
    }

    /// Never: a range holds at least 4 addresses.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The `i`-th address of the range, if it holds that many.
    pub fn nth(&self, i: u32) -> Option<Ipv4Addr> {
        (i < self.len()).then(|| Ipv4Addr::from(u32::from(self.base) + i))
    }

    /// Whether `ip` is in the range.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let mask = u32::MAX << (32 - u32::from(self.prefix));
        u32::from(ip) & mask == u32::from(self.base)
    }

    /// The agents' resolver, on every node: the range's first host address.
    pub fn resolver(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.base) + 1)
    }

    /// The addresses workloads may get: all but the first two (the network address and
    /// the resolver) and the last four (the /30 linking the node to the agent's
    /// namespace of workload addresses), lowest first.
    pub fn workload_addresses(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        (2..self.len() - 4).filter_map(|i| self.nth(i))
    }
}

impl fmt::Display for AddressRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.base, self.prefix)
    }
}

/// Why a range was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("address range {text:?}: {why}")]
pub struct BadRange {
    /// What was given.
    pub text: String,
    /// What is wrong with it.
    pub why: &'static str,
}

impl FromStr for AddressRange {
    type Err = BadRange;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why| BadRange {
            text: s.to_string(),
            why,
        };
        let (ip, prefix) = s
            .split_once('/')
            .ok_or_else(|| bad("write it as an IPv4 block, e.g. 169.254.100.0/22"))?;
        let base: Ipv4Addr = ip.parse().map_err(|_| bad("not an IPv4 address"))?;
        let prefix: u8 = prefix
            .parse()
            .map_err(|_| bad("the prefix length is not a number"))?;
        if !(8..=29).contains(&prefix) {
            return Err(bad("the prefix length must be 8 to 29"));
        }
        let range = AddressRange { base, prefix };
        if !range.contains(base) || u32::from(base) & !(u32::MAX << (32 - prefix)) != 0 {
            return Err(bad("host bits are set: give the block's first address"));
        }
        if base.is_loopback() || base.is_multicast() || base.is_broadcast() {
            return Err(bad(
                "loopback, multicast and broadcast blocks cannot be used",
            ));
        }
        Ok(range)
    }
}

impl Serialize for AddressRange {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for AddressRange {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// One instance behind a workload's address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Backend {
    /// Task id.
    pub task: String,
    /// The node it runs on.
    pub node: String,
    /// That node's agent-to-agent address (`IP:PORT`), as its agent reported it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh: Option<String>,
    /// Whether it takes new connections (running, and passing its readiness probe if
    /// it has one). Connections already open to one that is not ready stay open.
    pub ready: bool,
}

/// A workload's name, its address and what is behind it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    /// The workload's kind.
    pub kind: Kind,
    /// The workload's name, which resolves to `address`.
    pub name: String,
    /// The stable address.
    pub address: Ipv4Addr,
    /// The TCP ports it declares (`ports[].container`), served at `address`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
    /// Its running instances.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<Backend>,
}

impl Endpoint {
    /// The instances that take new connections.
    pub fn ready(&self) -> impl Iterator<Item = &Backend> {
        self.backends.iter().filter(|b| b.ready)
    }
}

/// What every agent routes by: the leader sends it whenever it changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Table {
    /// The range the addresses are from (the resolver is its first host address).
    pub range: AddressRange,
    /// Every workload with an address, by kind then name.
    pub endpoints: Vec<Endpoint>,
}

impl Default for Table {
    fn default() -> Self {
        Table {
            range: DEFAULT_RANGE,
            endpoints: Vec::new(),
        }
    }
}

impl Table {
    /// The workload a DNS name means: `NAME`, `NAME.bramble`, with or without the
    /// trailing dot, any case. Names are unique per kind only; when kinds share a name
    /// the first of Service, Wallet, CronJob, Job has it.
    pub fn lookup(&self, qname: &str) -> Option<&Endpoint> {
        let name = bare_name(qname)?;
        Kind::ALL.iter().find_map(|k| {
            self.endpoints
                .iter()
                .find(|e| e.kind == *k && e.name == name)
        })
    }

    /// The endpoint served at `address`.
    pub fn at(&self, address: Ipv4Addr) -> Option<&Endpoint> {
        self.endpoints.iter().find(|e| e.address == address)
    }
}

/// A workload in a table, by what makes it unique.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Gone {
    /// Its kind.
    pub kind: Kind,
    /// Its name.
    pub name: String,
}

/// What turns one table into the next: sent to an agent that holds the first instead of
/// the whole second. Why: every instance that starts or stops changes the table, and the
/// whole of it (about 75 KB for 1,000 instances) went to every node each time, copied
/// into every link's write buffer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Changes {
    /// The new table's range.
    pub range: AddressRange,
    /// Endpoints new or different in the new table, whole.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub set: Vec<Endpoint>,
    /// Endpoints the new table no longer has.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removed: Vec<Gone>,
}

impl Changes {
    /// Whether it changes nothing in a table of this range.
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.removed.is_empty()
    }
}

impl Table {
    /// What turns this table into `to`. Both list each (kind, name) once, as tables do.
    pub fn changes_to(&self, to: &Table) -> Changes {
        let before: std::collections::HashMap<(Kind, &str), &Endpoint> = self
            .endpoints
            .iter()
            .map(|e| ((e.kind, e.name.as_str()), e))
            .collect();
        let after: std::collections::HashSet<(Kind, &str)> = to
            .endpoints
            .iter()
            .map(|e| (e.kind, e.name.as_str()))
            .collect();
        Changes {
            range: to.range,
            set: to
                .endpoints
                .iter()
                .filter(|e| before.get(&(e.kind, e.name.as_str())) != Some(e))
                .cloned()
                .collect(),
            removed: self
                .endpoints
                .iter()
                .filter(|e| !after.contains(&(e.kind, e.name.as_str())))
                .map(|e| Gone {
                    kind: e.kind,
                    name: e.name.clone(),
                })
                .collect(),
        }
    }

    /// Applies `changes`: the result lists endpoints by kind then name, as the leader's
    /// tables do, so applying [`Table::changes_to`] gives the very table it was made to.
    pub fn apply(&mut self, changes: Changes) {
        let Changes {
            range,
            set,
            removed,
        } = changes;
        let mut by_key: std::collections::BTreeMap<(Kind, String), Endpoint> =
            std::mem::take(&mut self.endpoints)
                .into_iter()
                .map(|e| ((e.kind, e.name.clone()), e))
                .collect();
        for g in removed {
            by_key.remove(&(g.kind, g.name));
        }
        for e in set {
            by_key.insert((e.kind, e.name.clone()), e);
        }
        self.range = range;
        self.endpoints = by_key.into_values().collect();
    }
}

/// The workload name a query is for, if it is one of ours by its shape: a single label,
/// or a single label under [`DOMAIN`]. Lowercased, without the trailing dot.
pub fn bare_name(qname: &str) -> Option<String> {
    let q = qname
        .strip_suffix('.')
        .unwrap_or(qname)
        .to_ascii_lowercase();
    let label = match q.strip_suffix(DOMAIN) {
        Some(rest) => rest.strip_suffix('.')?.to_string(),
        None => q,
    };
    (!label.is_empty() && !label.contains('.')).then_some(label)
}

/// Whether a query is under [`DOMAIN`] (so a miss is ours to answer: no such name).
pub fn in_domain(qname: &str) -> bool {
    let q = qname
        .strip_suffix('.')
        .unwrap_or(qname)
        .to_ascii_lowercase();
    q == DOMAIN || q.ends_with(&format!(".{DOMAIN}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(kind: Kind, name: &str, last: u8) -> Endpoint {
        Endpoint {
            kind,
            name: name.into(),
            address: Ipv4Addr::new(169, 254, 100, last),
            ports: vec![80],
            backends: Vec::new(),
        }
    }

    #[test]
    fn ranges_parse_and_refuse_what_cannot_be_used() {
        let r: AddressRange = "169.254.100.0/22".parse().expect("valid");
        assert_eq!(r, DEFAULT_RANGE);
        assert_eq!(r.to_string(), "169.254.100.0/22");
        assert_eq!(r.len(), 1024);
        assert_eq!(r.resolver(), Ipv4Addr::new(169, 254, 100, 1));
        assert!(r.contains(Ipv4Addr::new(169, 254, 103, 255)));
        assert!(!r.contains(Ipv4Addr::new(169, 254, 104, 0)));
        let all: Vec<Ipv4Addr> = r.workload_addresses().collect();
        assert_eq!(all.len(), 1018);
        assert_eq!(all[0], Ipv4Addr::new(169, 254, 100, 2));
        assert_eq!(all[1017], Ipv4Addr::new(169, 254, 103, 251));
        for (bad, why) in [
            ("169.254.100.0", "write it as"),
            ("169.254.100.1/22", "host bits"),
            ("169.254.100.0/30", "8 to 29"),
            ("169.254.100.0/x", "not a number"),
            ("hello/22", "not an IPv4"),
            ("127.0.0.0/8", "loopback"),
        ] {
            let e = bad.parse::<AddressRange>().expect_err(bad);
            assert!(e.to_string().contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn a_name_is_found_bare_or_under_the_domain_in_any_case() {
        let t = Table {
            range: DEFAULT_RANGE,
            endpoints: vec![
                endpoint(Kind::Wallet, "ltc-wallet", 2),
                endpoint(Kind::Service, "pool", 3),
            ],
        };
        for q in [
            "ltc-wallet",
            "ltc-wallet.",
            "ltc-wallet.bramble",
            "LTC-Wallet.Bramble.",
        ] {
            assert_eq!(
                t.lookup(q).map(|e| e.address),
                Some(Ipv4Addr::new(169, 254, 100, 2)),
                "{q}"
            );
        }
        for q in [
            "ltc-wallet.example.com",
            "x.ltc-wallet.bramble",
            "bramble",
            "",
        ] {
            assert_eq!(t.lookup(q), None, "{q}");
        }
        assert!(in_domain("nothing.bramble."));
        assert!(!in_domain("example.com"));
        assert_eq!(
            t.at(Ipv4Addr::new(169, 254, 100, 3))
                .map(|e| e.name.as_str()),
            Some("pool")
        );
    }

    #[test]
    fn kinds_that_share_a_name_resolve_to_the_service_first() {
        let t = Table {
            range: DEFAULT_RANGE,
            endpoints: vec![
                endpoint(Kind::Job, "x", 5),
                endpoint(Kind::Wallet, "x", 4),
                endpoint(Kind::Service, "x", 3),
            ],
        };
        assert_eq!(t.lookup("x").map(|e| e.kind), Some(Kind::Service));
    }

    #[test]
    fn the_table_round_trips_as_json() {
        let t = Table {
            range: DEFAULT_RANGE,
            endpoints: vec![Endpoint {
                backends: vec![Backend {
                    task: "w-abc-0".into(),
                    node: "pi1".into(),
                    mesh: Some("10.0.0.1:7947".into()),
                    ready: true,
                }],
                ..endpoint(Kind::Wallet, "w", 2)
            }],
        };
        let text = serde_json::to_string(&t).expect("encodes");
        assert!(text.contains("\"range\":\"169.254.100.0/22\""), "{text}");
        assert_eq!(serde_json::from_str::<Table>(&text).expect("decodes"), t);
        assert!(serde_json::from_str::<Table>(r#"{"range":"1.2.3.4/22","endpoints":[]}"#).is_err());
    }

    /// A table of the given (kind index, name index, last address byte, ready
    /// instances) rows, listed as the leader lists them: by kind then name.
    fn table_of(rows: &[(usize, usize, u8, usize)]) -> Table {
        const NAMES: [&str; 4] = ["coin", "pool", "web", "cron"];
        let mut by_key = std::collections::BTreeMap::new();
        for &(k, n, last, ready) in rows {
            let kind = Kind::ALL[k % Kind::ALL.len()];
            let mut e = endpoint(kind, NAMES[n % NAMES.len()], last);
            e.backends = (0..ready)
                .map(|i| Backend {
                    task: format!("{}-{i}", e.name),
                    node: format!("pi-{i}"),
                    mesh: Some(format!("10.0.0.{i}:7879")),
                    ready: i % 2 == 0,
                })
                .collect();
            by_key.insert((kind, e.name.clone()), e);
        }
        Table {
            range: DEFAULT_RANGE,
            endpoints: by_key.into_values().collect(),
        }
    }

    #[test]
    fn changes_carry_only_what_differs_and_apply_to_the_next_table() {
        let before = table_of(&[(0, 0, 2, 1), (0, 1, 3, 2), (1, 0, 4, 1)]);
        // pool gets an instance, the Wallet coin goes, web comes.
        let after = table_of(&[(0, 0, 2, 1), (0, 1, 3, 3), (0, 2, 5, 0)]);
        let c = before.changes_to(&after);
        let set: Vec<&str> = c.set.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(set, ["pool", "web"]);
        assert_eq!(
            c.removed,
            [Gone {
                kind: Kind::ALL[1],
                name: "coin".into()
            }]
        );
        let mut t = before.clone();
        t.apply(c);
        assert_eq!(t, after);
        let none = after.changes_to(&after);
        assert!(none.is_empty(), "{none:?}");
        let mut same = after.clone();
        same.apply(none);
        assert_eq!(same, after);
    }

    #[test]
    fn changes_round_trip_as_json_and_name_only_what_they_change() {
        let c = table_of(&[(0, 0, 2, 1)]).changes_to(&table_of(&[(0, 1, 3, 0)]));
        let json = serde_json::to_string(&c).expect("encode");
        assert!(
            !json.contains("\"coin\",\"address\""),
            "a removed endpoint is named, not sent: {json}"
        );
        assert_eq!(serde_json::from_str::<Changes>(&json).expect("decode"), c);
        // Nothing changed: only the range.
        let none =
            serde_json::to_string(&Table::default().changes_to(&Table::default())).expect("encode");
        assert_eq!(none, r#"{"range":"169.254.100.0/22"}"#);
    }

    proptest::proptest! {
        #[test]
        fn applying_the_changes_between_two_tables_gives_the_second(
            a in proptest::collection::vec((0usize..4, 0usize..4, 2u8..9, 0usize..3), 0..10),
            b in proptest::collection::vec((0usize..4, 0usize..4, 2u8..9, 0usize..3), 0..10),
        ) {
            let (from, to) = (table_of(&a), table_of(&b));
            let changes = from.changes_to(&to);
            let sent: usize = changes.set.len() + changes.removed.len();
            let differ = to.endpoints.iter().filter(|e| !from.endpoints.contains(e)).count()
                + from
                    .endpoints
                    .iter()
                    .filter(|e| !to.endpoints.iter().any(|t| (t.kind, &t.name) == (e.kind, &e.name)))
                    .count();
            proptest::prop_assert_eq!(sent, differ);
            let mut got = from.clone();
            got.apply(changes);
            proptest::prop_assert_eq!(got, to);
        }
    }
}
