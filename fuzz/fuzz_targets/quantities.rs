//! Quantities and durations (`250m`, `64Mi`, `1h30m`), join tokens and fingerprints:
//! the small parsers under manifests, flags and the join.
#![no_main]

use bramble_api::duration::Duration;
use bramble_api::quantity::{Cpu, Memory};
use bramble_api::token::{Fingerprint, JoinToken};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = text.parse::<Cpu>();
        let _ = text.parse::<Memory>();
        let _ = text.parse::<Duration>();
        let _ = text.parse::<Fingerprint>();
        let _ = text.parse::<JoinToken>();
    }
});
