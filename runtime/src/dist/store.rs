//! The rendezvous store: a small key-value server over TCP (the role
//! PyTorch's TCPStore plays). One process hosts it (rank 0, or the
//! launcher); every rank is a client. Ranks publish their ring addresses
//! and NCCL's unique id, and wait at barriers. `get` blocks until the key
//! exists, up to the client's timeout, so no rank needs to poll.

use super::wire::{self, describe};
use super::DistError;
use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Sent first by a client; the server answers with the same bytes, so a
/// RUN_ID that points at something else fails at once with a clear error.
const HELLO: &[u8] = b"tessera-store/1";
const SET: u8 = 0;
const GET: u8 = 1;
const ADD: u8 = 2;
const OK: u8 = 0;
const TIMED_OUT: u8 = 1;
const BAD: u8 = 2;
/// Keys and values are small (addresses, ids, counters).
const LIMIT: u64 = 1 << 20;

#[derive(Default)]
struct Table {
    map: Mutex<HashMap<String, Vec<u8>>>,
    changed: Condvar,
}

/// The server; it runs until dropped.
pub struct StoreServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    table: Arc<Table>,
}

impl StoreServer {
    /// Listens on `addr` (`0.0.0.0:PORT` to serve other nodes; port 0 picks one).
    pub fn bind(addr: &str) -> Result<StoreServer, DistError> {
        let listener = TcpListener::bind(addr).map_err(|e| {
            DistError::new(format!(
                "cannot host the rendezvous store on {addr}: {e} (is the port taken by another run? choose another DISTRIBUTED.RUN_ID / MASTER_PORT)"
            ))
        })?;
        let addr = listener.local_addr().map_err(|e| DistError::new(format!("store address: {e}")))?;
        let stop = Arc::new(AtomicBool::new(false));
        let table = Arc::new(Table::default());
        let shared = table.clone();
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("tessera-store".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if flag.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    let (table, flag) = (table.clone(), flag.clone());
                    let _ = std::thread::Builder::new().name("tessera-store-conn".into()).spawn(move || {
                        let _ = serve(conn, &table, &flag);
                    });
                }
            })
            .map_err(|e| DistError::new(format!("store thread: {e}")))?;
        Ok(StoreServer { addr, stop, thread: Some(thread), table: shared })
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The value of `key` now, if set (the host reads without a connection).
    pub fn peek(&self, key: &str) -> Option<Vec<u8>> {
        self.table.map.lock().unwrap_or_else(|p| p.into_inner()).get(key).cloned()
    }
}

impl Drop for StoreServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop.
        let _ = TcpStream::connect(("127.0.0.1", self.addr.port()));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One client's requests, until it disconnects.
fn serve(mut conn: TcpStream, table: &Table, stop: &AtomicBool) -> std::io::Result<()> {
    conn.set_nodelay(true)?;
    let hello = wire::recv_any(&mut conn, 64)?;
    if hello != HELLO {
        return Ok(());
    }
    wire::send(&mut conn, HELLO)?;
    loop {
        let req = wire::recv_any(&mut conn, LIMIT)?;
        let reply = answer(&req, table, stop);
        wire::send(&mut conn, &reply)?;
    }
}

/// `[op][timeout ms: u64][key len: u32][key][value]` -> `[status][value]`.
fn answer(req: &[u8], table: &Table, stop: &AtomicBool) -> Vec<u8> {
    let parsed = (|| {
        let op = *req.first()?;
        let timeout = u64::from_le_bytes(req.get(1..9)?.try_into().ok()?);
        let klen = u32::from_le_bytes(req.get(9..13)?.try_into().ok()?) as usize;
        let key = std::str::from_utf8(req.get(13..13 + klen)?).ok()?.to_string();
        Some((op, Duration::from_millis(timeout), key, &req[13 + klen..]))
    })();
    let Some((op, timeout, key, value)) = parsed else { return vec![BAD] };
    let mut map = table.map.lock().unwrap_or_else(|p| p.into_inner());
    match op {
        SET => {
            map.insert(key, value.to_vec());
            table.changed.notify_all();
            vec![OK]
        }
        ADD => {
            let Ok(delta) = <[u8; 8]>::try_from(value).map(i64::from_le_bytes) else { return vec![BAD] };
            let now =
                map.get(&key).and_then(|v| <[u8; 8]>::try_from(&v[..]).ok()).map_or(0, i64::from_le_bytes) + delta;
            map.insert(key, now.to_le_bytes().to_vec());
            table.changed.notify_all();
            let mut out = vec![OK];
            out.extend(now.to_le_bytes());
            out
        }
        GET => {
            let deadline = Instant::now() + timeout;
            loop {
                if let Some(v) = map.get(&key) {
                    let mut out = vec![OK];
                    out.extend(v);
                    return out;
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() || stop.load(Ordering::SeqCst) {
                    return vec![TIMED_OUT];
                }
                map = table
                    .changed
                    .wait_timeout(map, left.min(Duration::from_millis(500)))
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        }
        _ => vec![BAD],
    }
}

/// A connection to the store.
pub struct StoreClient {
    conn: Mutex<TcpStream>,
    addr: String,
    timeout: Duration,
}

impl StoreClient {
    /// Connects to the store at `addr` (`host:port`), retrying until
    /// `timeout` (the host may not have started it yet).
    pub fn connect(addr: &str, timeout: Duration) -> Result<StoreClient, DistError> {
        let deadline = Instant::now() + timeout;
        let mut last = String::new();
        loop {
            let resolved: Vec<SocketAddr> = match addr.to_socket_addrs() {
                Ok(a) => a.collect(),
                Err(e) => {
                    return Err(DistError::new(format!(
                        "rendezvous address `{addr}`: {e} (DISTRIBUTED.RUN_ID / MASTER_ADDR:MASTER_PORT)"
                    )))
                }
            };
            for a in &resolved {
                match TcpStream::connect_timeout(a, Duration::from_secs(2)) {
                    Ok(s) => return StoreClient::handshake(s, addr, timeout),
                    Err(e) => last = e.to_string(),
                }
            }
            if Instant::now() >= deadline {
                return Err(DistError::new(format!(
                    "cannot reach the rendezvous store at {addr} within {:.0} s ({last}): is rank 0 running, and is DISTRIBUTED.RUN_ID (or MASTER_ADDR:MASTER_PORT) its address?",
                    timeout.as_secs_f64()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn handshake(mut s: TcpStream, addr: &str, timeout: Duration) -> Result<StoreClient, DistError> {
        let _ = s.set_nodelay(true);
        let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
        let ok = wire::send(&mut s, HELLO).and_then(|_| wire::recv_any(&mut s, 64));
        match ok {
            Ok(h) if h == HELLO => Ok(StoreClient { conn: Mutex::new(s), addr: addr.to_string(), timeout }),
            _ => Err(DistError::new(format!(
                "{addr} is not a tessera rendezvous store (another program listens there): check DISTRIBUTED.RUN_ID / MASTER_PORT"
            ))),
        }
    }

    /// The local address of the connection (this host's address on the
    /// network that reaches the store: where peers can reach this rank).
    pub fn local_ip(&self) -> Option<std::net::IpAddr> {
        self.conn.lock().ok()?.local_addr().ok().map(|a| a.ip())
    }

    fn request(&self, op: u8, key: &str, value: &[u8], wait: Duration) -> Result<Vec<u8>, DistError> {
        let mut req = vec![op];
        req.extend((wait.as_millis() as u64).to_le_bytes());
        req.extend((key.len() as u32).to_le_bytes());
        req.extend(key.as_bytes());
        req.extend(value);
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let _ = conn.set_read_timeout(Some(wait + Duration::from_secs(5)));
        let what = format!("rendezvous store at {}", self.addr);
        let reply = wire::send(&mut conn, &req)
            .and_then(|_| wire::recv_any(&mut conn, LIMIT))
            .map_err(|e| describe(&e, "the store's host (rank 0)", &what, wait))?;
        match reply.first() {
            Some(&OK) => Ok(reply[1..].to_vec()),
            Some(&TIMED_OUT) => Err(DistError::new(format!(
                "{what}: `{key}` was not set within {:.0} s (a rank did not join or stopped early)",
                wait.as_secs_f64()
            ))),
            _ => Err(DistError::new(format!("{what}: bad request for `{key}`"))),
        }
    }

    pub fn set(&self, key: &str, value: &[u8]) -> Result<(), DistError> {
        self.request(SET, key, value, self.timeout).map(|_| ())
    }

    /// The value of `key`, waiting up to the timeout for a rank to set it.
    pub fn get(&self, key: &str) -> Result<Vec<u8>, DistError> {
        self.request(GET, key, &[], self.timeout)
    }

    /// Adds `delta` to the counter `key` (0 if unset); returns the new value.
    pub fn add(&self, key: &str, delta: i64) -> Result<i64, DistError> {
        let v = self.request(ADD, key, &delta.to_le_bytes(), self.timeout)?;
        <[u8; 8]>::try_from(&v[..]).map(i64::from_le_bytes).map_err(|_| DistError::new("store: a bad counter"))
    }

    /// Returns once `world` ranks have called it with this `name`; the
    /// error names how many arrived.
    pub fn barrier(&self, name: &str, world: usize) -> Result<(), DistError> {
        let count = format!("barrier/{name}");
        let n = self.add(&count, 1)?;
        if n as usize == world {
            self.set(&format!("{count}/open"), b"")?;
        }
        self.get(&format!("{count}/open")).map(|_| ()).map_err(|e| {
            let arrived = self.add(&count, 0).unwrap_or(-1);
            DistError::new(format!("barrier `{name}`: {arrived} of {world} ranks arrived ({e})"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_get_add_and_barrier_across_threads() {
        let server = StoreServer::bind("127.0.0.1:0").unwrap();
        let addr = format!("127.0.0.1:{}", server.port());
        let t = Duration::from_secs(10);
        let handles: Vec<_> = (0..3)
            .map(|r| {
                let addr = addr.clone();
                std::thread::spawn(move || {
                    let c = StoreClient::connect(&addr, t).unwrap();
                    c.set(&format!("addr/{r}"), format!("rank{r}").as_bytes()).unwrap();
                    c.barrier("joined", 3).unwrap();
                    (0..3).map(|p| String::from_utf8(c.get(&format!("addr/{p}")).unwrap()).unwrap()).collect::<Vec<_>>()
                })
            })
            .collect();
        for h in handles {
            assert_eq!(h.join().unwrap(), ["rank0", "rank1", "rank2"]);
        }
        let c = StoreClient::connect(&addr, t).unwrap();
        assert_eq!(c.add("n", 5).unwrap(), 5);
        assert_eq!(c.add("n", -2).unwrap(), 3);
    }

    #[test]
    fn a_missing_rank_times_out_with_the_count() {
        let server = StoreServer::bind("127.0.0.1:0").unwrap();
        let c = StoreClient::connect(&format!("127.0.0.1:{}", server.port()), Duration::from_millis(300)).unwrap();
        let e = c.barrier("start", 2).unwrap_err().to_string();
        assert!(e.contains("1 of 2 ranks arrived"), "{e}");
    }

    #[test]
    fn an_unreachable_or_foreign_address_is_a_clear_error() {
        // A port nobody listens on (bound then freed).
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let e =
            StoreClient::connect(&format!("127.0.0.1:{port}"), Duration::from_millis(300)).err().unwrap().to_string();
        assert!(e.contains("cannot reach the rendezvous store") && e.contains("DISTRIBUTED.RUN_ID"), "{e}");
        // Something else listens: it answers nothing we know.
        let other = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = other.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for s in other.incoming().flatten() {
                let _ = std::io::Write::write_all(&mut &s, b"HTTP/1.1 400 Bad Request\r\n\r\n");
            }
        });
        let e = StoreClient::connect(&format!("127.0.0.1:{port}"), Duration::from_secs(5)).err().unwrap().to_string();
        assert!(e.contains("is not a tessera rendezvous store"), "{e}");
    }
}
