//! `AgentId::from_str` (`name@nodeid`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| fedmesh_protocol_fuzz::check_agent_id(data));
