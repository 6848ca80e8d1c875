//! `mqtt-floor`: the least a broker can do, to measure the machine's floor.
//!
//! A benchmark baseline, not a broker. It answers CONNECT, SUBSCRIBE and PINGREQ, and copies
//! every PUBLISH, byte for byte, to every other connection that has subscribed, whatever the
//! topic. One OS thread per connection reads with a blocking socket and writes straight into
//! the subscribers' sockets (TCP_NODELAY), so a message costs one wake-up inside the relay:
//! the publisher's reader thread. No queues, no topic matching, no sessions, no QoS 1
//! redelivery (a QoS 1 PUBLISH is acknowledged and copied as it is; the subscribers' PUBACKs
//! are ignored).
//!
//! Whatever latency a run through it shows is the load generator's and the host's (the
//! wake-ups, the scheduler, steal time), so it is the floor a real broker's figures stand
//! on. `scripts/bench-max-1k.sh` runs it beside the node and mosquitto (BENCHMARKS.md).
//!
//! ```sh
//! mqtt-floor --port 1884
//! ```

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex, PoisonError};

use anyhow::{Context, Result};
use clap::Parser;
use fedmesh_bench::mqtt::{self, Packet};

/// The least an MQTT 3.1.1 relay can do: a latency floor for benchmarks.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on.
    #[arg(long, default_value_t = 1884)]
    port: u16,
}

/// The connections that have subscribed, by connection number.
type Subscribers = Arc<Mutex<Vec<(u64, TcpStream)>>>;

/// Largest frame the relay accepts (the generator sends at most a few KiB).
const MAX_FRAME: usize = 1 << 20;

fn main() -> Result<()> {
    let args = Args::parse();
    let listener = TcpListener::bind((args.host.as_str(), args.port))
        .with_context(|| format!("binding {}:{}", args.host, args.port))?;
    let subscribers: Subscribers = Arc::default();
    for (id, stream) in (0u64..).zip(listener.incoming()) {
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                eprintln!("mqtt-floor: accept: {e}");
                continue;
            }
        };
        let subscribers = subscribers.clone();
        std::thread::spawn(move || {
            if let Err(e) = serve(id, stream, &subscribers) {
                eprintln!("mqtt-floor: connection {id}: {e:#}");
            }
            let mut subs = subscribers.lock().unwrap_or_else(PoisonError::into_inner);
            subs.retain(|(s, _)| *s != id);
        });
    }
    Ok(())
}

/// Length of the fixed header (type byte and remaining length) of a complete frame.
fn header_len(frame: &[u8]) -> usize {
    1 + frame[1..]
        .iter()
        .position(|b| b & 0x80 == 0)
        .map_or(4, |p| p + 1)
}

fn serve(id: u64, mut stream: TcpStream, subscribers: &Subscribers) -> Result<()> {
    stream.set_nodelay(true)?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut filled = 0;
    loop {
        if filled == buf.len() {
            anyhow::ensure!(buf.len() < MAX_FRAME, "frame over {MAX_FRAME} bytes");
            buf.resize(buf.len() * 2, 0);
        }
        let n = stream.read(&mut buf[filled..])?;
        if n == 0 {
            return Ok(());
        }
        filled += n;
        let mut start = 0;
        while let Some((packet, len)) = mqtt::parse(&buf[start..filled])? {
            let frame = &buf[start..start + len];
            match packet {
                Packet::Publish { qos, packet_id, .. } => {
                    if qos == 1 {
                        let mut ack = Vec::with_capacity(4);
                        mqtt::puback(&mut ack, packet_id);
                        stream.write_all(&ack)?;
                    }
                    let mut subs = subscribers.lock().unwrap_or_else(PoisonError::into_inner);
                    // A subscriber whose socket fails is dropped; its own thread ends it.
                    subs.retain_mut(|(s, out)| *s == id || out.write_all(frame).is_ok());
                }
                Packet::Other(1) => stream.write_all(&[0x20, 0x02, 0x00, 0x00])?, // CONNACK
                Packet::Other(8) => {
                    // SUBACK: the packet id, then grant each filter the QoS it asked for.
                    let body = &frame[header_len(frame)..];
                    anyhow::ensure!(body.len() >= 2, "short SUBSCRIBE");
                    let mut codes = Vec::new();
                    let mut j = 2;
                    while j + 2 <= body.len() {
                        let flen = usize::from(u16::from_be_bytes([body[j], body[j + 1]]));
                        j += 2 + flen;
                        codes.push(*body.get(j).context("SUBSCRIBE without options")? & 0x03);
                        j += 1;
                    }
                    let mut ack = vec![0x90, u8::try_from(2 + codes.len())?, body[0], body[1]];
                    ack.extend_from_slice(&codes);
                    stream.write_all(&ack)?;
                    let out = stream.try_clone()?;
                    out.set_nodelay(true)?;
                    let mut subs = subscribers.lock().unwrap_or_else(PoisonError::into_inner);
                    if !subs.iter().any(|(s, _)| *s == id) {
                        subs.push((id, out));
                    }
                }
                Packet::Other(12) => stream.write_all(&[0xD0, 0x00])?, // PINGRESP
                Packet::Other(14) => return Ok(()),                    // DISCONNECT
                _ => {}                                                // PUBACK and the rest
            }
            start += len;
        }
        buf.copy_within(start..filled, 0);
        filled -= start;
    }
}

#[cfg(test)]
mod tests {
    use super::header_len;

    #[test]
    fn header_lengths() {
        assert_eq!(header_len(&[0x82, 8, 0, 1]), 2);
        assert_eq!(header_len(&[0x30, 0x80, 0x01, 0]), 3);
        assert_eq!(header_len(&[0x30, 0xFF, 0xFF, 0x7F]), 4);
    }
}
