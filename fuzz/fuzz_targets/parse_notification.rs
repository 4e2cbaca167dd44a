//! Fuzzes the one place where raw webhook bodies become domain types.
//! Whatever the bytes, parsing must not panic, and an accepted notification
//! must be self-consistent.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qualia_webhook::activity::{ActivityType, Notification};

fuzz_target!(|data: &[u8]| {
    if let Ok(n) = Notification::parse(data) {
        assert!(ActivityType::parse(n.activity_type.as_str()).is_some());
        assert!(!n.order_id.as_ref().trim().is_empty());
        assert_eq!(n.raw.as_bytes(), data);
        let key = n.dedup_key();
        assert!(key.key.contains(n.order_id.as_ref()));
        assert_eq!(key.forever, n.needs_enrichment());
    }
});
