//! Arbitrary bytes as a sealed batch: refused or opened, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let keys = heliosdb_tenant_replication::seal::FileKeys::default();
    let _ = heliosdb_tenant_replication::seal::open(data, "tenant-a", None, &keys);
});
