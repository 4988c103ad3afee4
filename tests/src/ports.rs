//! Free TCP ports on loopback for servers a test starts next. Shared by the harness and
//! by the etcd fixture of the controller's tests (which includes this file by path):
//! each keeps its own counter in its own range, so the two counters of one process
//! (the HA tests have both) never hand out one port twice.

use std::net::TcpListener;
use std::sync::atomic::{AtomicU32, Ordering};

/// A port in `low..low + span` that is free now, counted on from `next` (which starts at
/// `u32::MAX`). Released again: another process may take it meanwhile, but never as an
/// outgoing connection's source port, as the range lies below the kernel's ephemeral
/// ports (32768 and up by default). A port from `bind(0)`, released, was now and then
/// some outgoing connection's source port by the time the server bound it ("address
/// already in use"). The count starts at a place of this process's own.
pub fn free_port_in(next: &AtomicU32, low: u32, span: u32) -> u16 {
    let _ = next.compare_exchange(
        u32::MAX,
        std::process::id().wrapping_mul(7919) % span,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..span {
        let port = (low + next.fetch_add(1, Ordering::SeqCst) % span) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {low}..{}", low + span)
}
