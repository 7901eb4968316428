//! Length-prefixed messages over TCP, with errors that say which peer
//! failed and how (closed: it exited; timed out: it hangs or is too slow).

use super::DistError;
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// Why a read or write on the link to `peer` failed, in words.
pub fn describe(e: &std::io::Error, peer: &str, what: &str, timeout: Duration) -> DistError {
    let why = match e.kind() {
        ErrorKind::UnexpectedEof
        | ErrorKind::ConnectionReset
        | ErrorKind::BrokenPipe
        | ErrorKind::ConnectionAborted => {
            format!("{peer} closed the connection (the process exited or was killed)")
        }
        ErrorKind::WouldBlock | ErrorKind::TimedOut => {
            format!(
                "nothing from {peer} for {:.0} s (it hangs, or TESSERA_DIST_TIMEOUT is too short)",
                timeout.as_secs_f64()
            )
        }
        _ => format!("{peer}: {e}"),
    };
    DistError::new(format!("{what}: {why}"))
}

/// Writes `payload` with its length in front.
pub fn send(s: &mut TcpStream, payload: &[u8]) -> std::io::Result<()> {
    s.write_all(&(payload.len() as u64).to_le_bytes())?;
    s.write_all(payload)
}

/// Reads one message of exactly `expected` bytes into `out`; a message of
/// another length is an error (the peer runs another plan).
pub fn recv_exact(s: &mut TcpStream, out: &mut [u8]) -> std::io::Result<Result<(), u64>> {
    let mut len = [0u8; 8];
    s.read_exact(&mut len)?;
    let len = u64::from_le_bytes(len);
    if len != out.len() as u64 {
        return Ok(Err(len));
    }
    s.read_exact(out)?;
    Ok(Ok(()))
}

/// Reads one message of any length (up to `limit` bytes).
pub fn recv_any(s: &mut TcpStream, limit: u64) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 8];
    s.read_exact(&mut len)?;
    let len = u64::from_le_bytes(len);
    if len > limit {
        return Err(std::io::Error::new(ErrorKind::InvalidData, format!("a message of {len} bytes (limit {limit})")));
    }
    let mut out = vec![0u8; len as usize];
    s.read_exact(&mut out)?;
    Ok(out)
}
