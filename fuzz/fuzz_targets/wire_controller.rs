//! The agent's end of the link: every frame the controller sends, and what the agent
//! does with endpoint changes (applies them to the table it holds).
#![no_main]

use bramble_api::endpoints::Table;
use bramble_api::wire::{self, ControllerMessage};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(ControllerMessage::EndpointChanges { changes, .. }) =
            wire::decode::<ControllerMessage>(text)
        {
            let mut table = Table::default();
            table.apply(changes.clone());
            // Applying the same changes again changes nothing more.
            let once = table.clone();
            table.apply(changes);
            assert_eq!(table, once);
        }
    }
});
