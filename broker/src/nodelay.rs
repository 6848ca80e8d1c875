//! TCP_NODELAY for the sockets rumqttd accepts on its internal listeners.
//!
//! rumqttd 0.20 binds and accepts its listener itself (`Server::start`) and never sets
//! TCP_NODELAY, so every small frame it writes towards the proxy (deliveries, PUBACKs,
//! CONNACKs) may wait for the proxy's delayed ACK: up to 40 ms per hop (measured: p99
//! 17.7 ms at 50 K msg/s, a constant ≈ 88 ms per local task round trip).
//!
//! **Preferred mechanism, [`Mechanism::ListenerNodelay`]:** on Linux an accepted TCP
//! socket inherits TCP_NODELAY from its listening socket (the listener's `tcp_sock` is
//! cloned into the child, `nonagle` included). rumqttd's listening socket is a file
//! descriptor of *this* process, so we find it and set TCP_NODELAY on it before any
//! proxied client connects: `pidfd_open(getpid())` + `pidfd_getfd` give us, without
//! `unsafe`, an owned duplicate of each socket descriptor listed in `/proc/self/fd`; the
//! duplicate shares the open file description, so a socket option set through it applies
//! to rumqttd's socket. We keep the descriptor that is a listening socket
//! (`SO_ACCEPTCONN`) bound to the internal listener's address, set TCP_NODELAY and read
//! it back. Nothing of rumqttd is patched and the cost is paid once per listener.
//!
//! **Fallback, [`Mechanism::QuickAck`]:** when `pidfd_getfd` is unavailable (kernel
//! older than 5.6, a seccomp filter, or a non-Linux system) or the listener cannot be
//! found, the proxy re-arms TCP_QUICKACK on its upstream socket after every read. Then
//! the proxy acknowledges rumqttd's segments at once and Nagle's wait for an ACK lasts
//! one loopback round trip instead of the delayed-ACK timer. It costs a system call per
//! read. (The kernel clears TCP_QUICKACK by itself, hence the re-arming.)
//!
//! Why not the alternatives: patching rumqttd (a vendored fork to maintain for one line);
//! an `LD_PRELOAD` shim (the diagnostic in `bench/diag/`; not a product); owning the
//! accept path (rumqttd's `Server::start` binds its own listener and its per-connection
//! entry point is private).
//!
//! Which mechanism is active is logged when a listener starts, is available from
//! `Broker::nodelay_mechanism`, and is exported as the `internal_listeners_nodelay` gauge
//! (internal listeners whose accepted sockets get TCP_NODELAY) and the
//! `upstream_quickack_connections` counter.

use std::net::SocketAddr;

/// How rumqttd's side of the proxy → rumqttd connections avoids delayed-ACK stalls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    /// TCP_NODELAY is set on rumqttd's listening socket; accepted sockets inherit it.
    ListenerNodelay,
    /// The proxy re-arms TCP_QUICKACK on its upstream socket after every read.
    QuickAck,
}

impl Mechanism {
    /// A short name for logs and status pages.
    pub fn as_str(self) -> &'static str {
        match self {
            Mechanism::ListenerNodelay => "listener-nodelay",
            Mechanism::QuickAck => "quickack",
        }
    }
}

/// Why TCP_NODELAY could not be set on a listening socket.
#[derive(Debug, thiserror::Error)]
pub(crate) enum NodelayError {
    /// The mechanism is not available in this process (no `pidfd_getfd`, not Linux).
    #[error("pidfd_getfd unavailable: {0}")]
    Unavailable(String),
    /// No listening socket bound to the address (yet).
    #[error("no listening socket bound to {0}")]
    NotFound(SocketAddr),
    /// Reading `/proc/self/fd` or setting the option failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

#[cfg(target_os = "linux")]
mod imp {
    use std::net::SocketAddr;
    use std::os::fd::OwnedFd;

    use rustix::io::Errno;
    use rustix::net::sockopt;
    use rustix::process::{PidfdFlags, PidfdGetfdFlags, getpid, pidfd_getfd, pidfd_open};

    use super::NodelayError;

    fn unavailable(e: Errno) -> bool {
        matches!(e, Errno::NOSYS | Errno::PERM | Errno::ACCESS)
    }

    /// Owned duplicates of this process's socket descriptors, made one at a time (each
    /// is closed before the next is made unless the caller keeps it, so a process with
    /// thousands of connections does not double its descriptor count).
    fn sockets() -> Result<impl Iterator<Item = Result<OwnedFd, NodelayError>>, NodelayError> {
        let pidfd = pidfd_open(getpid(), PidfdFlags::empty()).map_err(|e| {
            if unavailable(e) {
                NodelayError::Unavailable(format!("pidfd_open: {e}"))
            } else {
                NodelayError::Io(e.into())
            }
        })?;
        let mut raw_fds = Vec::new();
        for entry in std::fs::read_dir("/proc/self/fd")? {
            let entry = entry?;
            let Some(raw) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<i32>().ok())
            else {
                continue;
            };
            // Skip everything that is not a socket without duplicating it.
            if std::fs::read_link(entry.path())
                .is_ok_and(|t| t.as_os_str().as_encoded_bytes().starts_with(b"socket:"))
            {
                raw_fds.push(raw);
            }
        }
        Ok(raw_fds.into_iter().filter_map(move |raw| {
            match pidfd_getfd(&pidfd, raw, PidfdGetfdFlags::empty()) {
                Ok(fd) => Some(Ok(fd)),
                Err(e) if unavailable(e) => {
                    Some(Err(NodelayError::Unavailable(format!("pidfd_getfd: {e}"))))
                }
                // Closed meanwhile (EBADF), or something we need not look at.
                Err(_) => None,
            }
        }))
    }

    fn bound_to(fd: &OwnedFd, addr: SocketAddr) -> bool {
        rustix::net::getsockname(fd)
            .ok()
            .and_then(|a| SocketAddr::try_from(a).ok())
            == Some(addr)
    }

    /// A duplicate of the listening TCP socket bound to `addr`.
    pub(crate) fn find_listener(addr: SocketAddr) -> Result<OwnedFd, NodelayError> {
        for fd in sockets()? {
            let fd = fd?;
            if sockopt::socket_acceptconn(&fd).unwrap_or(false) && bound_to(&fd, addr) {
                return Ok(fd);
            }
        }
        Err(NodelayError::NotFound(addr))
    }

    /// TCP_NODELAY of every accepted (non-listening) socket of this process whose local
    /// address is `addr`: rumqttd's side of the proxied connections.
    #[cfg(test)]
    pub(crate) fn accepted_nodelay(addr: SocketAddr) -> Vec<bool> {
        sockets()
            .map(|fds| {
                fds.filter_map(Result::ok)
                    .filter(|fd| {
                        !sockopt::socket_acceptconn(fd).unwrap_or(true) && bound_to(fd, addr)
                    })
                    .map(|fd| sockopt::tcp_nodelay(&fd).unwrap_or(false))
                    .collect()
            })
            .unwrap_or_default()
    }

    pub(crate) fn set_listener_nodelay(addr: SocketAddr) -> Result<(), NodelayError> {
        let fd = find_listener(addr)?;
        sockopt::set_tcp_nodelay(&fd, true).map_err(std::io::Error::from)?;
        if !sockopt::tcp_nodelay(&fd).map_err(std::io::Error::from)? {
            return Err(NodelayError::Io(std::io::Error::other(
                "TCP_NODELAY did not stick on the listening socket",
            )));
        }
        Ok(())
    }

    pub(crate) fn quickack<Fd: std::os::fd::AsFd>(fd: Fd) -> std::io::Result<()> {
        sockopt::set_tcp_quickack(fd, true).map_err(Into::into)
    }
}

/// Sets TCP_NODELAY on this process's listening socket bound to `addr`, so that every
/// socket it accepts from now on has TCP_NODELAY.
#[cfg(target_os = "linux")]
pub(crate) fn set_listener_nodelay(addr: SocketAddr) -> Result<(), NodelayError> {
    imp::set_listener_nodelay(addr)
}

/// Sets TCP_NODELAY on this process's listening socket bound to `addr`, so that every
/// socket it accepts from now on has TCP_NODELAY.
#[cfg(not(target_os = "linux"))]
pub(crate) fn set_listener_nodelay(_addr: SocketAddr) -> Result<(), NodelayError> {
    Err(NodelayError::Unavailable("not Linux".into()))
}

#[cfg(all(test, target_os = "linux"))]
pub(crate) use imp::accepted_nodelay;

/// Re-arms TCP_QUICKACK (the fallback mechanism). Errors are ignored: it is an
/// optimisation.
pub(crate) fn rearm_quickack(stream: &tokio::net::tcp::OwnedReadHalf) {
    #[cfg(target_os = "linux")]
    {
        let _ = imp::quickack(stream.as_ref());
    }
    #[cfg(not(target_os = "linux"))]
    let _ = stream;
}

#[cfg(all(test, target_os = "linux"))]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::net::{TcpListener, TcpStream};

    use rustix::net::sockopt;

    use super::*;

    /// The mechanism itself: a listener bound elsewhere in this process (std, no
    /// NODELAY) gets TCP_NODELAY through a pidfd duplicate, and the sockets it accepts
    /// afterwards inherit it.
    #[test]
    fn accepted_sockets_inherit_nodelay_from_listener() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();

        let _c1 = TcpStream::connect(addr).unwrap();
        let (before, _) = listener.accept().unwrap();
        assert!(!before.nodelay().unwrap(), "Linux default is Nagle on");

        set_listener_nodelay(addr).unwrap();
        let _c2 = TcpStream::connect(addr).unwrap();
        let (after, _) = listener.accept().unwrap();
        assert!(
            after.nodelay().unwrap(),
            "accepted socket must inherit TCP_NODELAY"
        );
        // The accepted socket, found the same way the listener is, has it too.
        let dup = imp::find_listener(addr).unwrap();
        assert!(sockopt::tcp_nodelay(&dup).unwrap());
    }

    #[test]
    fn unknown_address_is_not_found() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        assert!(matches!(
            set_listener_nodelay(addr),
            Err(NodelayError::NotFound(_))
        ));
    }
}
