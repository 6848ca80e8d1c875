//! `fedmesh_protocol::open_batch`: the input is split into length-prefixed envelopes, and every
//! result must equal what `open` says about that envelope alone.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| fedmesh_protocol_fuzz::check_open_batch(data));
