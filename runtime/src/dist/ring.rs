//! The CPU collective: ranks in a ring over TCP, each sending to the next
//! rank and receiving from the previous one. All-reduce is a
//! reduce-scatter then an all-gather around the ring (each rank moves
//! 2(W-1)/W of the data, whatever W: no rank is a bottleneck); all-gather
//! passes blocks around; broadcast forwards from the root, in pieces so the
//! ring pipelines them.
//!
//! Each element of an all-reduce is reduced by one rank and then copied to
//! the others, so every rank ends with bitwise the same values.

use super::store::StoreClient;
use super::wire::{self, describe};
use super::{Collective, DistError, Element, Reduction};
use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Messages up to this size are sent before receiving, on one thread: the
/// socket buffers hold them, so the ring cannot deadlock.
const INLINE: usize = 32 << 10;
/// Broadcast's pieces.
const PIECE: usize = 4 << 20;

pub struct RingCollective {
    rank: usize,
    world: usize,
    timeout: Duration,
    /// To rank + 1, from rank - 1 (None alone).
    links: Option<Mutex<(TcpStream, TcpStream)>>,
}

fn prepare(s: &TcpStream, timeout: Duration) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))
}

impl RingCollective {
    /// Joins the ring of `world` ranks named `name` through the store:
    /// publishes this rank's address, connects to the next rank, accepts
    /// the previous one. Fails (naming the rank) if a neighbour does not
    /// join within `timeout`.
    pub fn join(
        store: &StoreClient,
        name: &str,
        rank: usize,
        world: usize,
        timeout: Duration,
    ) -> Result<RingCollective, DistError> {
        if world == 0 || rank >= world {
            return Err(DistError::new(format!("rank {rank} is not in a world of {world}")));
        }
        if world == 1 {
            return Ok(RingCollective { rank, world, timeout, links: None });
        }
        let ip = store.local_ip().unwrap_or(std::net::IpAddr::from([127, 0, 0, 1]));
        let listener = TcpListener::bind((ip, 0))
            .map_err(|e| DistError::new(format!("rank {rank}: cannot listen on {ip}: {e}")))?;
        let me = listener.local_addr().map_err(|e| DistError::new(e.to_string()))?;
        store.set(&format!("{name}/ring/{rank}"), me.to_string().as_bytes())?;
        let (next, prev) = ((rank + 1) % world, (rank + world - 1) % world);
        let there = String::from_utf8(
            store
                .get(&format!("{name}/ring/{next}"))
                .map_err(|e| DistError::new(format!("rank {rank} waited for rank {next} to join: {e}")))?,
        )
        .map_err(|_| DistError::new("a bad ring address"))?;
        let deadline = Instant::now() + timeout;
        let mut to_next = loop {
            match TcpStream::connect(&there) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => {
                    return Err(DistError::new(format!("rank {rank} cannot connect to rank {next} at {there}: {e}")))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        prepare(&to_next, timeout).map_err(|e| DistError::new(e.to_string()))?;
        wire::send(&mut to_next, &(rank as u32).to_le_bytes())
            .map_err(|e| describe(&e, &format!("rank {next}"), "joining the ring", timeout))?;
        listener.set_nonblocking(true).map_err(|e| DistError::new(e.to_string()))?;
        let mut from_prev = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Err(e) => {
                    return Err(DistError::new(format!(
                        "rank {rank}: rank {prev} did not connect within {:.0} s ({e})",
                        timeout.as_secs_f64()
                    )))
                }
            }
        };
        from_prev.set_nonblocking(false).map_err(|e| DistError::new(e.to_string()))?;
        prepare(&from_prev, timeout).map_err(|e| DistError::new(e.to_string()))?;
        let mut hello = [0u8; 4];
        match wire::recv_exact(&mut from_prev, &mut hello) {
            Ok(Ok(())) if u32::from_le_bytes(hello) as usize == prev => {}
            _ => return Err(DistError::new(format!("rank {rank}: the ring's previous rank is not rank {prev}"))),
        }
        Ok(RingCollective { rank, world, timeout, links: Some(Mutex::new((to_next, from_prev))) })
    }

    fn next(&self) -> usize {
        (self.rank + 1) % self.world
    }

    fn prev(&self) -> usize {
        (self.rank + self.world - 1) % self.world
    }

    /// Sends `out` to the next rank while receiving a message of exactly
    /// `into.len()` elements from the previous one, which is reduced into
    /// `into` (or copied, `op` None) piece by piece as it arrives, so the
    /// arithmetic overlaps the transfer.
    fn exchange<T: Element>(
        &self,
        links: &mut (TcpStream, TcpStream),
        out: &[T],
        into: &mut [T],
        op: Option<Reduction>,
        what: &str,
    ) -> Result<(), DistError> {
        let (next, prev) = links;
        let (n, p) = (self.next(), self.prev());
        let context = format!("{what} on rank {}", self.rank);
        let fail_send = |e: std::io::Error| describe(&e, &format!("rank {n}"), &context, self.timeout);
        let fail_recv = |e: std::io::Error| describe(&e, &format!("rank {p}"), &context, self.timeout);
        let bytes = as_bytes(out);
        let received = if bytes.len() <= INLINE {
            wire::send(next, bytes).map_err(fail_send)?;
            receive(prev, into, op).map_err(fail_recv)?
        } else {
            std::thread::scope(|sc| {
                let sender = sc.spawn(|| wire::send(next, bytes));
                let got = receive(prev, into, op);
                let sent = sender.join().unwrap_or_else(|_| Err(std::io::Error::other("the sending thread panicked")));
                sent.map_err(fail_send)?;
                got.map_err(fail_recv)
            })?
        };
        received.map_err(|len| {
            DistError::new(format!(
                "{context}: rank {p} sent {len} bytes where {} were expected (the ranks run different plans or configs)",
                into.len() * T::BYTES
            ))
        })
    }

    fn all_reduce<T: Element>(&self, data: &mut [T], op: Reduction) -> Result<(), DistError> {
        let Some(links) = &self.links else { return Ok(()) };
        let mut links = links.lock().unwrap_or_else(|p| p.into_inner());
        let (w, r, n) = (self.world, self.rank, data.len());
        let range = |c: usize| c * n / w..(c + 1) * n / w;
        // Reduce-scatter: after W-1 steps rank r holds chunk r+1 reduced.
        for s in 0..w - 1 {
            let (send, recv) = two(data, range((r + w - s) % w), range((r + 2 * w - s - 1) % w));
            self.exchange(&mut links, send, recv, Some(op), "all_reduce")?;
        }
        if op == Reduction::Mean {
            for x in &mut data[range((r + 1) % w)] {
                *x = x.divide(w);
            }
        }
        // All-gather of the reduced chunks.
        for s in 0..w - 1 {
            let (send, recv) = two(data, range((r + 1 + w - s) % w), range((r + w - s) % w));
            self.exchange(&mut links, send, recv, None, "all_reduce")?;
        }
        Ok(())
    }
}

// Messages carry the floats' own bytes (no encoding pass).
#[cfg(not(target_endian = "little"))]
compile_error!("the ring collective sends native little-endian floats");

/// The elements' bytes (`Element` types are plain floats: every bit
/// pattern is valid, no padding).
fn as_bytes<T: Element>(v: &[T]) -> &[u8] {
    // SAFETY: see above; the length is the slice's size in bytes.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

fn as_bytes_mut<T: Element>(v: &mut [T]) -> &mut [u8] {
    // SAFETY: as `as_bytes`; any bytes written make a valid float.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u8, std::mem::size_of_val(v)) }
}

/// The disjoint ranges `a` (to read) and `b` (to write) of `data`.
fn two<T>(data: &mut [T], a: std::ops::Range<usize>, b: std::ops::Range<usize>) -> (&[T], &mut [T]) {
    if a.end <= b.start {
        let (lo, hi) = data.split_at_mut(b.start);
        (&lo[a], &mut hi[..b.len()])
    } else {
        debug_assert!(b.end <= a.start || b.is_empty() || a.is_empty(), "overlapping ranges {a:?} and {b:?}");
        let at = a.start.max(b.end);
        let (lo, hi) = data.split_at_mut(at);
        (&hi[a.start - at..a.end - at], &mut lo[b])
    }
}

/// Elements per piece of a received message: reduced while the next
/// piece is still on its way.
const RECV_PIECE: usize = 1 << 16;

/// Receives one message of `into.len()` elements into `into` (reduced with
/// `op`, or copied); `Ok(Err(len))` for a message of another length.
fn receive<T: Element>(s: &mut TcpStream, into: &mut [T], op: Option<Reduction>) -> std::io::Result<Result<(), u64>> {
    let mut len = [0u8; 8];
    s.read_exact(&mut len)?;
    let len = u64::from_le_bytes(len);
    if len != (into.len() * T::BYTES) as u64 {
        return Ok(Err(len));
    }
    match op {
        None => s.read_exact(as_bytes_mut(into))?,
        Some(op) => {
            let mut piece = vec![T::default(); RECV_PIECE.min(into.len())];
            for chunk in into.chunks_mut(RECV_PIECE) {
                let got = &mut piece[..chunk.len()];
                s.read_exact(as_bytes_mut(got))?;
                for (x, &y) in chunk.iter_mut().zip(got.iter()) {
                    *x = x.combine(y, op);
                }
            }
        }
    }
    Ok(Ok(()))
}

impl Collective for RingCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn all_reduce_f32(&self, data: &mut [f32], op: Reduction) -> Result<(), DistError> {
        self.all_reduce(data, op)
    }

    fn all_reduce_f64(&self, data: &mut [f64], op: Reduction) -> Result<(), DistError> {
        self.all_reduce(data, op)
    }

    fn reduce_scatter_f32(&self, data: &[f32]) -> Result<Vec<f32>, DistError> {
        let Some(links) = &self.links else { return Ok(data.to_vec()) };
        let (w, r) = (self.world, self.rank);
        if !data.len().is_multiple_of(w) {
            return Err(DistError::new(format!("reduce_scatter of {} elements over {w} ranks", data.len())));
        }
        let mut links = links.lock().unwrap_or_else(|p| p.into_inner());
        let l = data.len() / w;
        let mut acc = data.to_vec();
        // The ring's reduce-scatter shifted by one block, so that rank r
        // ends with block r summed over every rank.
        for s in 0..w - 1 {
            let (send, recv) = ((r + 2 * w - s - 1) % w, (r + 2 * w - s - 2) % w);
            let (out, into) = two(&mut acc, send * l..(send + 1) * l, recv * l..(recv + 1) * l);
            self.exchange(&mut links, out, into, Some(Reduction::Sum), "reduce_scatter")?;
        }
        Ok(acc[r * l..(r + 1) * l].to_vec())
    }

    fn all_gather_f32(&self, data: &[f32]) -> Result<Vec<f32>, DistError> {
        let Some(links) = &self.links else { return Ok(data.to_vec()) };
        let mut links = links.lock().unwrap_or_else(|p| p.into_inner());
        let (w, r, l) = (self.world, self.rank, data.len());
        let mut all = vec![0f32; w * l];
        all[r * l..(r + 1) * l].copy_from_slice(data);
        for s in 0..w - 1 {
            let (send, recv) = ((r + w - s) % w, (r + 2 * w - s - 1) % w);
            let (out, into) = two(&mut all, send * l..(send + 1) * l, recv * l..(recv + 1) * l);
            self.exchange(&mut links, out, into, None, "all_gather")?;
        }
        Ok(all)
    }

    fn broadcast_f32(&self, data: &mut [f32], root: usize) -> Result<(), DistError> {
        let Some(links) = &self.links else { return Ok(()) };
        if root >= self.world {
            return Err(DistError::new(format!("broadcast from rank {root} in a world of {}", self.world)));
        }
        let mut links = links.lock().unwrap_or_else(|p| p.into_inner());
        let (next, prev) = (self.next(), self.prev());
        let what = format!("broadcast from rank {root} on rank {}", self.rank);
        for piece in data.chunks_mut(PIECE / 4) {
            if self.rank != root {
                match receive(&mut links.1, piece, None) {
                    Ok(Ok(())) => {}
                    Ok(Err(len)) => {
                        return Err(DistError::new(format!(
                        "{what}: rank {prev} sent {len} bytes where {} were expected (the ranks run different plans)",
                        piece.len() * 4
                    )))
                    }
                    Err(e) => return Err(describe(&e, &format!("rank {prev}"), &what, self.timeout)),
                }
            }
            if next != root {
                wire::send(&mut links.0, as_bytes(piece))
                    .map_err(|e| describe(&e, &format!("rank {next}"), &what, self.timeout))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::StoreServer;
    use super::*;
    use std::sync::Arc;

    /// Runs `f(rank, ring)` on `world` threads joined in one ring.
    fn on_ring<R: Send + 'static>(
        world: usize,
        f: impl Fn(usize, &RingCollective) -> R + Send + Sync + 'static,
    ) -> Vec<R> {
        let server = StoreServer::bind("127.0.0.1:0").unwrap();
        let addr = format!("127.0.0.1:{}", server.port());
        let f = Arc::new(f);
        let handles: Vec<_> = (0..world)
            .map(|r| {
                let (addr, f) = (addr.clone(), f.clone());
                std::thread::spawn(move || {
                    let store = StoreClient::connect(&addr, Duration::from_secs(10)).unwrap();
                    let ring = RingCollective::join(&store, "t", r, world, Duration::from_secs(10)).unwrap();
                    f(r, &ring)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn all_reduce_matches_the_sum_and_is_bitwise_equal_on_every_rank() {
        for world in [1, 2, 3, 4] {
            // Sizes below, at and above the world size, and one large
            // enough to take the threaded exchange.
            for n in [1usize, 3, 7, 100_003] {
                let input = move |r: usize, i: usize| ((r * 31 + i * 7) % 97) as f32 * 0.01 - 0.3;
                let got = on_ring(world, move |r, ring| {
                    let mut sum: Vec<f32> = (0..n).map(|i| input(r, i)).collect();
                    let mut mean = sum.clone();
                    let mut max = sum.clone();
                    ring.all_reduce_f32(&mut sum, Reduction::Sum).unwrap();
                    ring.all_reduce_f32(&mut mean, Reduction::Mean).unwrap();
                    ring.all_reduce_f32(&mut max, Reduction::Max).unwrap();
                    (sum, mean, max)
                });
                for (sum, mean, max) in &got {
                    assert_eq!(
                        (sum, mean, max),
                        (&got[0].0, &got[0].1, &got[0].2),
                        "world {world} n {n}: ranks differ"
                    );
                    for i in 0..n {
                        let exact: f64 = (0..world).map(|r| input(r, i) as f64).sum();
                        let top = (0..world).map(|r| input(r, i)).fold(f32::MIN, f32::max);
                        assert!((sum[i] as f64 - exact).abs() < 1e-5, "world {world} n {n} sum[{i}]");
                        assert!((mean[i] as f64 - exact / world as f64).abs() < 1e-5, "mean[{i}]");
                        assert_eq!(max[i], top, "max[{i}]");
                    }
                }
            }
        }
    }

    #[test]
    fn all_gather_and_broadcast_put_blocks_in_rank_order() {
        for world in [2, 3] {
            let got = on_ring(world, |r, ring| {
                let gathered = ring.all_gather_f32(&[r as f32, 10.0 + r as f32]).unwrap();
                let mut b: Vec<f32> =
                    if r == 1 { (0..2_000_000).map(|i| i as f32).collect() } else { vec![0.0; 2_000_000] };
                ring.broadcast_f32(&mut b, 1).unwrap();
                let mut f = [r as f64 + 0.5];
                ring.all_reduce_f64(&mut f, Reduction::Sum).unwrap();
                (gathered, b.iter().enumerate().all(|(i, &v)| v == i as f32), f[0])
            });
            let expect: Vec<f32> = (0..world).flat_map(|r| [r as f32, 10.0 + r as f32]).collect();
            let scattered = on_ring(world, move |r, ring| {
                let data: Vec<f32> = (0..2 * world).map(|i| (r * 10 + i) as f32).collect();
                let mut id = if r == 0 { *b"unique-id\xff\x00\x7f\x80" } else { [0u8; 13] };
                ring.broadcast_bytes(&mut id).unwrap();
                assert_eq!(&id, b"unique-id\xff\x00\x7f\x80", "broadcast_bytes on rank {r}");
                (r, ring.reduce_scatter_f32(&data).unwrap())
            });
            for (r, block) in scattered {
                let sum = |i: usize| (0..world).map(|q| (q * 10 + i) as f32).sum::<f32>();
                assert_eq!(block, [sum(2 * r), sum(2 * r + 1)], "reduce_scatter, rank {r} of {world}");
            }
            for (g, b, f) in got {
                assert_eq!(g, expect);
                assert!(b, "broadcast");
                assert_eq!(f, (0..world).map(|r| r as f64 + 0.5).sum::<f64>());
            }
        }
    }

    #[test]
    fn a_rank_with_another_size_or_one_that_exits_is_an_error_not_a_hang() {
        let got = on_ring(2, |r, ring| {
            let mut v = vec![1.0f32; if r == 0 { 10 } else { 12 }];
            ring.all_reduce_f32(&mut v, Reduction::Sum).err().map(|e| e.to_string())
        });
        assert!(got.iter().any(|e| e.as_deref().is_some_and(|e| e.contains("different plans"))), "{got:?}");
        let got = on_ring(3, |r, ring| {
            if r == 2 {
                return None; // leaves: its sockets close
            }
            let mut v = vec![1.0f32; 8];
            ring.all_reduce_f32(&mut v, Reduction::Sum).err().map(|e| e.to_string())
        });
        // Every live rank fails; which neighbour it sees close first depends on
        // timing (rank 1 may exit after its own error before rank 0 reads from it),
        // but the rank next to the one that left names it.
        assert!(got[..2].iter().all(|e| e.as_deref().is_some_and(|e| e.contains("closed the connection"))), "{got:?}");
        assert!(
            got.iter().any(|e| e.as_deref().is_some_and(|e| e.contains("rank 2 closed the connection"))),
            "{got:?}"
        );
    }
}
