//! The controller's end of the agent link: every frame an agent (or anyone with the join
//! token) sends is decoded and checked against the limits. The heartbeat fast path must
//! decode every input exactly as the general decoder does.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let fast = bramble_api::wire::decode_agent(text).map_err(|e| e.to_string());
        let reference =
            bramble_api::wire::decode_agent_reference(text).map_err(|e| e.to_string());
        assert_eq!(fast, reference, "the heartbeat fast path disagrees");
    }
});
