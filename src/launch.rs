//! The launcher: `tessera train` with DISTRIBUTED.NUM_PROC_PER_NODE > 1
//! starts that many workers of itself on this node (VISSL's
//! launch_distributed; torchrun's role), hosts the rendezvous store on the
//! first node, and watches them: when one fails, the others are stopped
//! within a bounded time and the failure is reported with the rank and its
//! last step. Workers learn their place from torchrun's variables, so
//! `torchrun --no-python tessera train ...` and `srun` start the same workers.

use anyhow::{anyhow, bail, Result};
use serde_json::Value;
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tessera_runtime::dist::StoreServer;

/// The workers this node starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    pub num_nodes: usize,
    pub per_node: usize,
    pub node: usize,
    /// `host:port` of the store (port 0 on one node: any free port).
    pub store: String,
}

fn count(tree: &Value, key: &str) -> Result<usize> {
    let v = tree.pointer(&format!("/DISTRIBUTED/{key}"));
    match v.and_then(Value::as_u64) {
        Some(n) if n >= 1 => Ok(n as usize),
        _ => bail!(
            "config key `DISTRIBUTED.{key}` must be an integer of at least 1, got {}",
            v.map_or("nothing".into(), |v| v.to_string())
        ),
    }
}

/// What the config asks this node to start, or `None` for one process.
/// `node_rank`: `--node-rank`, else DISTRIBUTED.NODE_ID.
pub fn from_config(tree: &Value, node_rank: Option<usize>) -> Result<Option<Launch>> {
    let num_nodes = count(tree, "NUM_NODES")?;
    let per_node = count(tree, "NUM_PROC_PER_NODE")?;
    if num_nodes * per_node == 1 {
        return Ok(None);
    }
    let node = match node_rank {
        Some(n) => n,
        None => tree.pointer("/DISTRIBUTED/NODE_ID").and_then(Value::as_u64).unwrap_or(0) as usize,
    };
    if node >= num_nodes {
        bail!("node rank {node} is not among DISTRIBUTED.NUM_NODES {num_nodes} (ranks 0..{})", num_nodes - 1);
    }
    let method = tree.pointer("/DISTRIBUTED/INIT_METHOD").and_then(Value::as_str).unwrap_or("tcp");
    if method != "tcp" {
        bail!("config key `DISTRIBUTED.INIT_METHOD` is `{method}`; tessera's launcher rendezvous over tcp (RUN_ID host:port), and torchrun's variables cover `env`");
    }
    let run_id = tree.pointer("/DISTRIBUTED/RUN_ID").and_then(Value::as_str).unwrap_or("auto");
    let store = match run_id {
        "auto" if num_nodes == 1 => "127.0.0.1:0".to_string(),
        "auto" => bail!(
            "DISTRIBUTED.NUM_NODES is {num_nodes}: set DISTRIBUTED.RUN_ID=host:port, the first node's address and a free port (VISSL asserts the same)"
        ),
        id => match id.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => id.to_string(),
            _ => bail!("config key `DISTRIBUTED.RUN_ID` is `{id}`; it must be host:port (or auto on one node)"),
        },
    };
    Ok(Some(Launch { num_nodes, per_node, node, store }))
}

/// One worker.
struct Worker {
    rank: usize,
    child: Child,
    status: Option<ExitStatus>,
}

fn describe(status: &ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exited with status {c}"),
        (None, Some(9)) => "was killed (SIGKILL)".into(),
        (None, Some(s)) => format!("was killed by signal {s}"),
        _ => "ended".into(),
    }
}

fn signal(w: &Worker, sig: i32) {
    if w.status.is_none() {
        // SAFETY: kill(2) on a child's pid, which we have not reaped.
        unsafe {
            libc::kill(w.child.id() as i32, sig);
        }
    }
}

/// Starts this node's workers (this program, with the same arguments) and
/// waits for them. `stop` is set by SIGINT/SIGTERM: forwarded as SIGTERM
/// (each worker checkpoints and stops at the same step).
pub fn run(l: &Launch, stop: Arc<AtomicBool>, grace: Duration) -> Result<()> {
    let world = l.num_nodes * l.per_node;
    // The first node hosts the store; every worker connects to it.
    let (server, addr) = if l.node == 0 {
        let (host, port) = l.store.rsplit_once(':').expect("checked in from_config");
        let bind = if l.num_nodes == 1 { format!("{host}:{port}") } else { format!("0.0.0.0:{port}") };
        let server = StoreServer::bind(&bind).map_err(|e| anyhow!("{e}"))?;
        let addr = format!("{host}:{}", server.port());
        (Some(server), addr)
    } else {
        (None, l.store.clone())
    };
    let (master_addr, master_port) = addr.rsplit_once(':').expect("host:port");
    let exe = std::env::current_exe().map_err(|e| anyhow!("cannot find this program to start workers: {e}"))?;
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = (cores / l.per_node).max(1).to_string();
    tessera_engine::errln!(
        "tessera: starting {} worker(s) on node {} of {} (world size {world}, store {addr})",
        l.per_node,
        l.node,
        l.num_nodes
    );
    let mut workers = Vec::new();
    for local in 0..l.per_node {
        let rank = l.node * l.per_node + local;
        let mut cmd = Command::new(&exe);
        cmd.args(&args)
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", world.to_string())
            .env("LOCAL_RANK", local.to_string())
            .env("LOCAL_WORLD_SIZE", l.per_node.to_string())
            .env("MASTER_ADDR", master_addr)
            .env("MASTER_PORT", master_port)
            .env("TESSERA_STORE_HOSTED", "1");
        if std::env::var_os("RAYON_NUM_THREADS").is_none() {
            cmd.env("RAYON_NUM_THREADS", &threads);
        }
        // A worker dies with the launcher (no orphans if it is killed).
        // SAFETY: the closure runs between fork and exec and only calls
        // prctl, which is async-signal-safe.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|e| anyhow!("cannot start worker {rank}: {e}"))?;
        workers.push(Worker { rank, child, status: None });
    }
    // Workers report their steps to the store; the first node's launcher
    // hosts it and can name a failed rank's last step (other nodes cannot).
    let last_step = |rank: usize| -> String {
        match &server {
            Some(s) => s
                .peek(&format!("step/{rank}"))
                .map(|v| format!(" after step {}", String::from_utf8_lossy(&v)))
                .unwrap_or_else(|| " before its first step".into()),
            None => String::new(),
        }
    };
    // Failures seen, in order. A rank that dies makes its neighbours fail
    // too (their collectives see it close): the report names a rank killed
    // by a signal before one that exited with an error, looking at every
    // exit within half a second of the first.
    let mut failures: Vec<(usize, ExitStatus, String)> = Vec::new();
    let mut first_failure: Option<Instant> = None;
    let mut failure: Option<String> = None;
    let mut forwarded = false;
    let mut deadline: Option<Instant> = None;
    loop {
        for w in workers.iter_mut().filter(|w| w.status.is_none()) {
            if let Ok(Some(st)) = w.child.try_wait() {
                w.status = Some(st);
                if !st.success() {
                    failures.push((w.rank, st, last_step(w.rank)));
                    first_failure.get_or_insert_with(Instant::now);
                }
            }
        }
        let all_done = workers.iter().all(|w| w.status.is_some());
        let settled = first_failure.is_some_and(|t| t.elapsed() >= Duration::from_millis(500)) || all_done;
        if failure.is_none() && settled && !failures.is_empty() {
            use std::os::unix::process::ExitStatusExt;
            let (rank, st, step) = failures.iter().find(|(_, st, _)| st.signal().is_some()).unwrap_or(&failures[0]);
            failure = Some(format!("rank {rank} {}{step}", describe(st)));
        }
        if all_done {
            break;
        }
        if stop.load(Ordering::SeqCst) && !forwarded {
            workers.iter().for_each(|w| signal(w, libc::SIGTERM));
            forwarded = true;
        }
        if let (Some(f), None) = (&failure, deadline) {
            tessera_engine::errln!("tessera: {f}; stopping the other ranks");
            workers.iter().for_each(|w| signal(w, libc::SIGTERM));
            deadline = Some(Instant::now() + grace);
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            workers.iter().for_each(|w| signal(w, libc::SIGKILL));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    match failure {
        Some(f) => bail!("{f}; every rank has stopped, and the last checkpoint is where the run resumes (run the same command again)"),
        None => Ok(()),
    }
}
