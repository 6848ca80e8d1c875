//! `fedmesh_protocol::open`: envelope bytes to a verified envelope, at a fixed clock.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| fedmesh_protocol_fuzz::check_open(data));
