//! The pure request pipeline (contract section 4) on arbitrary requests: classification, head
//! checks, the body limit, the strict parse and every rule, as `kms_tag_guard::decide::decision`
//! runs them, under three policies. It must never panic, and it checks what must always hold.
//!
//! The input format, the three configurations (the built-in one and the two of
//! `tests/fixtures/`) and the checks are in `tests/common/fuzz_pipeline.rs`, which
//! `tests/properties.rs` also runs on every committed seed.

#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;

use kms_tag_guard::Config;

#[path = "../../tests/common/fuzz_pipeline.rs"]
mod fuzz_pipeline;

static CONFIGS: LazyLock<[Config; 3]> = LazyLock::new(fuzz_pipeline::configs);

fuzz_target!(|data: &[u8]| {
    if let Err(failed) = fuzz_pipeline::check(data, &*CONFIGS) {
        panic!("{failed}");
    }
});
