//! The resolver containers on this node use ([`bramble_api::endpoints`]): it answers
//! `NAME` and `NAME.bramble` with the workload's stable address from the routing table,
//! says "no such name" for other names under `.bramble`, and passes every other query
//! on to the node's own resolvers (`/etc/resolv.conf`; the agent, on the host, reaches
//! even a 127.0.0.53 stub that containers cannot).
//!
//! The decisions are pure ([`parse_query`], [`decide`], [`reply`]); [`serve`] is the
//! thin UDP and TCP loop around them.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bramble_api::endpoints::{in_domain, Table};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

use crate::routes::Routes;

/// How long answers may be cached: the address behind a name never changes, so only
/// names not yet applied would gain from less (and those get no TTL: NXDOMAIN without
/// an SOA is not cached).
const TTL: u32 = 30;
/// What a forwarded query waits for its upstream answer.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(3);
const TYPE_A: u16 = 1;
const TYPE_ANY: u16 = 255;
const CLASS_IN: u16 = 1;

/// One question of a query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    /// Message id.
    pub id: u16,
    /// Recursion desired (echoed).
    pub rd: bool,
    /// The name asked, dotted, without the trailing dot.
    pub name: String,
    /// Query type.
    pub qtype: u16,
    /// Query class.
    pub qclass: u16,
    /// Where the question ends in the message.
    question_end: usize,
}

/// What to do with a query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// This address.
    Address(Ipv4Addr),
    /// The name is ours, but has no record of the asked type (AAAA, MX...).
    NoData,
    /// No such name.
    NxDomain,
    /// Not ours: ask the node's resolvers.
    Forward,
}

/// The question of a standard query, or `None` for anything else (answers, other
/// opcodes, several questions, compressed names, truncated messages).
pub fn parse_query(msg: &[u8]) -> Option<Query> {
    if msg.len() < 12 {
        return None;
    }
    let id = u16::from_be_bytes([msg[0], msg[1]]);
    let flags = u16::from_be_bytes([msg[2], msg[3]]);
    let qr = flags & 0x8000 != 0;
    let opcode = (flags >> 11) & 0xf;
    let qdcount = u16::from_be_bytes([msg[4], msg[5]]);
    if qr || opcode != 0 || qdcount != 1 {
        return None;
    }
    let mut at = 12;
    let mut labels: Vec<String> = Vec::new();
    loop {
        let len = usize::from(*msg.get(at)?);
        at += 1;
        if len == 0 {
            break;
        }
        // Pointers (0xc0) and the reserved forms have no place in a question.
        if len > 63 {
            return None;
        }
        let label = msg.get(at..at + len)?;
        labels.push(String::from_utf8_lossy(label).into_owned());
        at += len;
        if at > 12 + 255 {
            return None;
        }
    }
    let qtype = u16::from_be_bytes([*msg.get(at)?, *msg.get(at + 1)?]);
    let qclass = u16::from_be_bytes([*msg.get(at + 2)?, *msg.get(at + 3)?]);
    Some(Query {
        id,
        rd: flags & 0x0100 != 0,
        name: labels.join("."),
        qtype,
        qclass,
        question_end: at + 4,
    })
}

/// What the table says about `q`.
pub fn decide(table: &Table, q: &Query) -> Decision {
    if let Some(e) = table.lookup(&q.name) {
        return if q.qclass == CLASS_IN && (q.qtype == TYPE_A || q.qtype == TYPE_ANY) {
            Decision::Address(e.address)
        } else {
            Decision::NoData
        };
    }
    if in_domain(&q.name) {
        Decision::NxDomain
    } else {
        Decision::Forward
    }
}

/// The answer message to `q` (asked in `msg`), authoritative: an address, no data,
/// no such name, or (for `Forward`, when no resolver answered) a server failure.
pub fn reply(msg: &[u8], q: &Query, d: Decision) -> Vec<u8> {
    let rcode: u16 = match d {
        Decision::Address(_) | Decision::NoData => 0,
        Decision::NxDomain => 3,
        Decision::Forward => 2,
    };
    let aa: u16 = if d == Decision::Forward { 0 } else { 0x0400 };
    let flags: u16 = 0x8000 | aa | if q.rd { 0x0100 } else { 0 } | 0x0080 | rcode;
    let answers: u16 = matches!(d, Decision::Address(_)).into();
    let mut out = Vec::with_capacity(q.question_end + 16);
    out.extend_from_slice(&q.id.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&answers.to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(&msg[12..q.question_end]);
    if let Decision::Address(ip) = d {
        // The name is the question's (a pointer to offset 12).
        out.extend_from_slice(&[0xc0, 0x0c]);
        out.extend_from_slice(&TYPE_A.to_be_bytes());
        out.extend_from_slice(&CLASS_IN.to_be_bytes());
        out.extend_from_slice(&TTL.to_be_bytes());
        out.extend_from_slice(&4u16.to_be_bytes());
        out.extend_from_slice(&ip.octets());
    }
    out
}

/// The node's resolvers and search domains, from `resolv.conf` text. Resolvers in the
/// workloads' range (ours) are left out.
pub fn host_resolvers(text: &str, table: &Table) -> (Vec<SocketAddr>, Vec<String>) {
    let mut servers = Vec::new();
    let mut search = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("nameserver") => {
                if let Some(ip) = words
                    .next()
                    .and_then(|w| w.parse::<std::net::IpAddr>().ok())
                {
                    let ours = matches!(ip, std::net::IpAddr::V4(v4) if table.range.contains(v4));
                    if !ours {
                        servers.push(SocketAddr::new(ip, 53));
                    }
                }
            }
            Some("search" | "domain") => {
                search = words.map(str::to_string).collect();
            }
            _ => {}
        }
    }
    (servers, search)
}

/// Answers queries at `addr`:53 (UDP and TCP) until the task is aborted. Fails only if
/// it cannot listen.
pub async fn serve(
    ns: &crate::proxy::Namespace,
    addr: Ipv4Addr,
    routes: Routes,
    upstream: Vec<SocketAddr>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let at = SocketAddr::from((addr, 53));
    let udp = Arc::new(ns.udp(at).await?);
    let tcp = ns.tcp(at).await?;
    let upstream = Arc::new(upstream);
    tracing::info!(%addr, upstream = ?upstream, "resolver for containers listening");
    Ok(tokio::spawn(async move {
        // One task: aborting it stops both.
        tokio::select! {
            () = serve_udp(udp, routes.clone(), Arc::clone(&upstream)) => {}
            () = serve_tcp(tcp, routes, upstream) => {}
        }
    }))
}

async fn serve_udp(udp: Arc<UdpSocket>, routes: Routes, upstream: Arc<Vec<SocketAddr>>) {
    let mut buf = vec![0u8; 4096];
    loop {
        let (n, from) = match udp.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                tracing::debug!(error = %e, "resolver: receive failed");
                continue;
            }
        };
        let msg = buf[..n].to_vec();
        let Some(q) = parse_query(&msg) else { continue };
        let d = decide(&routes.current(), &q);
        if d != Decision::Forward {
            let _ = udp.send_to(&reply(&msg, &q, d), from).await;
            continue;
        }
        let udp = Arc::clone(&udp);
        let upstream = Arc::clone(&upstream);
        tokio::spawn(async move {
            let answer = match forward(&msg, &upstream).await {
                Some(a) => a,
                None => reply(&msg, &q, Decision::Forward),
            };
            let _ = udp.send_to(&answer, from).await;
        });
    }
}

/// The first answer of the node's resolvers to `msg`, over UDP.
async fn forward(msg: &[u8], upstream: &[SocketAddr]) -> Option<Vec<u8>> {
    for server in upstream {
        let bind: SocketAddr = if server.is_ipv4() {
            "0.0.0.0:0".parse().ok()?
        } else {
            "[::]:0".parse().ok()?
        };
        let Ok(sock) = UdpSocket::bind(bind).await else {
            continue;
        };
        if sock.send_to(msg, server).await.is_err() {
            continue;
        }
        let mut buf = vec![0u8; 4096];
        if let Ok(Ok((n, _))) =
            tokio::time::timeout(UPSTREAM_TIMEOUT, sock.recv_from(&mut buf)).await
        {
            buf.truncate(n);
            // The answer must be to this query.
            if buf.len() >= 2 && buf[..2] == msg[..2] {
                return Some(buf);
            }
        }
    }
    None
}

async fn serve_tcp(listener: TcpListener, routes: Routes, upstream: Arc<Vec<SocketAddr>>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let routes = routes.clone();
        let upstream = Arc::clone(&upstream);
        tokio::spawn(async move {
            let _ = tokio::time::timeout(
                Duration::from_secs(10),
                answer_tcp(stream, &routes, &upstream),
            )
            .await;
        });
    }
}

async fn answer_tcp(
    mut stream: TcpStream,
    routes: &Routes,
    upstream: &[SocketAddr],
) -> std::io::Result<()> {
    loop {
        let len = usize::from(stream.read_u16().await?);
        let mut msg = vec![0u8; len];
        stream.read_exact(&mut msg).await?;
        let Some(q) = parse_query(&msg) else {
            return Ok(());
        };
        let d = decide(&routes.current(), &q);
        let answer = if d == Decision::Forward {
            forward(&msg, upstream)
                .await
                .unwrap_or_else(|| reply(&msg, &q, d))
        } else {
            reply(&msg, &q, d)
        };
        let n = u16::try_from(answer.len()).unwrap_or(u16::MAX);
        stream.write_u16(n).await?;
        stream.write_all(&answer[..usize::from(n)]).await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bramble_api::endpoints::{Endpoint, DEFAULT_RANGE};
    use bramble_api::manifest::Kind;

    fn query(name: &str, qtype: u16) -> Vec<u8> {
        let mut m = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in name.split('.').filter(|l| !l.is_empty()) {
            m.push(u8::try_from(label.len()).expect("short"));
            m.extend_from_slice(label.as_bytes());
        }
        m.push(0);
        m.extend_from_slice(&qtype.to_be_bytes());
        m.extend_from_slice(&CLASS_IN.to_be_bytes());
        m
    }

    fn table() -> Table {
        Table {
            range: DEFAULT_RANGE,
            endpoints: vec![Endpoint {
                kind: Kind::Wallet,
                name: "ltc-wallet".into(),
                address: Ipv4Addr::new(169, 254, 100, 2),
                ports: vec![9332],
                backends: Vec::new(),
            }],
        }
    }

    #[test]
    fn a_workload_name_gets_its_address_and_nothing_else_is_made_up() {
        let t = table();
        for (name, qtype, want) in [
            (
                "ltc-wallet",
                TYPE_A,
                Decision::Address(Ipv4Addr::new(169, 254, 100, 2)),
            ),
            (
                "ltc-wallet.bramble",
                TYPE_A,
                Decision::Address(Ipv4Addr::new(169, 254, 100, 2)),
            ),
            (
                "LTC-WALLET.bramble",
                TYPE_ANY,
                Decision::Address(Ipv4Addr::new(169, 254, 100, 2)),
            ),
            ("ltc-wallet", 28, Decision::NoData),
            ("other.bramble", TYPE_A, Decision::NxDomain),
            ("example.com", TYPE_A, Decision::Forward),
            ("ltc-wallet.example.com", TYPE_A, Decision::Forward),
            ("printer", TYPE_A, Decision::Forward),
        ] {
            let msg = query(name, qtype);
            let q = parse_query(&msg).expect(name);
            assert_eq!(q.name, name);
            assert_eq!(decide(&t, &q), want, "{name} {qtype}");
        }
    }

    #[test]
    fn answers_are_well_formed() {
        let msg = query("ltc-wallet.bramble", TYPE_A);
        let q = parse_query(&msg).expect("query");
        let a = reply(&msg, &q, Decision::Address(Ipv4Addr::new(169, 254, 100, 2)));
        assert_eq!(&a[..2], &[0x12, 0x34], "same id");
        assert_eq!(a[2] & 0x80, 0x80, "a response");
        assert_eq!(a[2] & 0x04, 0x04, "authoritative");
        assert_eq!(a[3] & 0x0f, 0, "NOERROR");
        assert_eq!(&a[6..8], &[0, 1], "one answer");
        assert_eq!(&a[12..msg.len()], &msg[12..], "the question echoed");
        assert_eq!(&a[a.len() - 4..], &[169, 254, 100, 2]);
        let nx = reply(&msg, &q, Decision::NxDomain);
        assert_eq!(nx[3] & 0x0f, 3);
        assert_eq!(&nx[6..8], &[0, 0]);
        let fail = reply(&msg, &q, Decision::Forward);
        assert_eq!(fail[3] & 0x0f, 2, "SERVFAIL when no resolver answered");
    }

    #[test]
    fn malformed_messages_are_ignored() {
        let good = query("a.bramble", TYPE_A);
        assert!(parse_query(&good[..good.len() - 1]).is_none(), "truncated");
        assert!(parse_query(&[0; 5]).is_none());
        let mut answer = good.clone();
        answer[2] |= 0x80;
        assert!(parse_query(&answer).is_none(), "a response");
        let mut two = good.clone();
        two[5] = 2;
        assert!(parse_query(&two).is_none(), "two questions");
        let mut pointer = good.clone();
        pointer[12] = 0xc0;
        assert!(parse_query(&pointer).is_none(), "a compressed name");
        let mut long = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for _ in 0..100 {
            long.extend_from_slice(&[3, b'a', b'b', b'c']);
        }
        long.extend_from_slice(&[0, 0, 1, 0, 1]);
        assert!(parse_query(&long).is_none(), "a name over 255 bytes");
    }

    #[test]
    fn the_hosts_resolvers_are_read_and_ours_left_out() {
        let text = "# comment\nnameserver 127.0.0.53\nnameserver 169.254.100.1\nnameserver ::1\nsearch lan home.arpa\noptions edns0\n";
        let (servers, search) = host_resolvers(text, &table());
        assert_eq!(
            servers,
            vec![
                "127.0.0.53:53".parse::<SocketAddr>().expect("addr"),
                "[::1]:53".parse().expect("addr")
            ]
        );
        assert_eq!(search, vec!["lan", "home.arpa"]);
    }
}
