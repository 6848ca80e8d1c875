//! `NodeId::from_str` (libp2p peer id text).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| fedmesh_protocol_fuzz::check_node_id(data));
