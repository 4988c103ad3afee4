//! YAML manifests, as `bramblectl apply` and `POST /v1/apply` take them: parsed and
//! validated into workloads. Any input: an error, never a panic, a stack overflow or an
//! allocation out of proportion to it.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = bramble_api::parse::parse_manifests("fuzz.yaml", text);
    }
});
