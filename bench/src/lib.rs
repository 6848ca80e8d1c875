//! Load generation for fedmesh benchmarks.
//!
//! * [`mqtt`]: a minimal MQTT 3.1.1 encoder and frame parser (just what a load generator
//!   needs: CONNECT, SUBSCRIBE, PUBLISH QoS 0/1, PUBACK, DISCONNECT);
//! * [`stamp`]: the header every generated payload starts with (publisher, sequence
//!   number, send time), from which a subscriber derives latency, loss and duplicates;
//! * [`hist`]: a fixed-size log-linear latency histogram (< 0.8 % relative error).
//!
//! The `mqtt-load` binary (`src/bin/mqtt-load.rs`) puts them together, over plain TCP or,
//! with `--tls-ca`, over TLS (rustls with *ring*, as the node's `mqtt.listen_tls`).

pub mod hist;
pub mod mqtt;
pub mod stamp;
