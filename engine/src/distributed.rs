//! Where this process sits in a data-parallel run, and joining it.
//!
//! A run of several processes is described by torchrun's variables (RANK,
//! WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT),
//! which tessera's own launcher sets for its workers too, or by SLURM's
//! (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_NTASKS_PER_NODE) with
//! the store's address from DISTRIBUTED.RUN_ID. Rank 0 hosts the rendezvous
//! store unless a launcher already does (ours: TESSERA_STORE_HOSTED;
//! torchrun's agent: TORCHELASTIC_USE_AGENT_STORE, then rank 0 hosts it on
//! MASTER_PORT + 1, as the agent's own store holds MASTER_PORT).

use crate::meters::AccuracyListMeter;
use crate::trainer::EngineError;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tessera_runtime::dist::{
    timeout_from_env, Collective, DistError, Reduction, RingCollective, StoreClient, StoreServer,
};
use tessera_runtime::Executor;

/// This process's place in the run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Place {
    pub rank: usize,
    pub world: usize,
    pub local_rank: usize,
    /// Processes per node.
    pub local_world: usize,
    /// The store: `host:port`.
    pub store: String,
    /// Whether this process starts the store (rank 0, when no launcher does).
    pub hosts_store: bool,
}

impl Place {
    pub fn num_nodes(&self) -> usize {
        self.world / self.local_world.max(1)
    }

    pub fn node(&self) -> usize {
        self.rank / self.local_world.max(1)
    }
}

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn number(name: &str) -> Result<Option<usize>, String> {
    match var(name) {
        None => Ok(None),
        Some(v) => {
            v.trim().parse().map(Some).map_err(|_| format!("environment variable {name} is `{v}`, not a number"))
        }
    }
}

/// The place the environment gives (a launcher started this process), or
/// `None` for a process started on its own. `run_id` is DISTRIBUTED.RUN_ID,
/// the store's address for SLURM runs.
pub fn place_from_env(run_id: &str) -> Result<Option<Place>, String> {
    if let (Some(rank), Some(world)) = (number("RANK")?, number("WORLD_SIZE")?) {
        let local_rank = number("LOCAL_RANK")?.unwrap_or(0);
        let local_world = number("LOCAL_WORLD_SIZE")?.unwrap_or(world);
        let addr = var("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into());
        let port = number("MASTER_PORT")?.ok_or("RANK and WORLD_SIZE are set but MASTER_PORT is not")?;
        let agent = var("TORCHELASTIC_USE_AGENT_STORE").is_some_and(|v| v.eq_ignore_ascii_case("true"));
        let ours = var("TESSERA_STORE_HOSTED").is_some();
        let port = if agent && !ours { port + 1 } else { port };
        return check(Place {
            rank,
            world,
            local_rank,
            local_world,
            store: format!("{addr}:{port}"),
            hosts_store: rank == 0 && !ours,
        })
        .map(Some);
    }
    if let (Some(rank), Some(world)) = (number("SLURM_PROCID")?, number("SLURM_NTASKS")?) {
        if world > 1 {
            if !run_id.contains(':') || run_id == "auto" {
                return Err(format!(
                    "a SLURM run of {world} tasks needs DISTRIBUTED.RUN_ID=host:port, the first node's address and a free port (it is `{run_id}`)"
                ));
            }
            let local_world = var("SLURM_NTASKS_PER_NODE")
                .and_then(|v| v.split('(').next().and_then(|n| n.trim().parse().ok()))
                .unwrap_or(world);
            return check(Place {
                rank,
                world,
                local_rank: number("SLURM_LOCALID")?.unwrap_or(0),
                local_world,
                store: run_id.to_string(),
                hosts_store: rank == 0,
            })
            .map(Some);
        }
    }
    Ok(None)
}

fn check(p: Place) -> Result<Place, String> {
    if p.world == 0 || p.rank >= p.world || p.local_world == 0 || p.local_rank >= p.local_world {
        return Err(format!(
            "the launcher's environment is inconsistent: rank {} of {} (local rank {} of {})",
            p.rank, p.world, p.local_rank, p.local_world
        ));
    }
    if !p.world.is_multiple_of(p.local_world) {
        return Err(format!("{} processes do not fill nodes of {} each", p.world, p.local_world));
    }
    Ok(p)
}

/// A joined run: the collective, the store, and (on the hosting rank) the
/// store's server, which lives as long as this.
pub struct World {
    pub place: Place,
    pub comm: Arc<dyn Collective>,
    pub store: StoreClient,
    _server: Option<StoreServer>,
}

impl World {
    /// Joins the run: hosts the store if this process should, connects to
    /// it, and joins the ring of every rank. Everything waits at most
    /// `TESSERA_DIST_TIMEOUT` seconds (default 300: a slow node may still be
    /// compiling) for the other ranks.
    pub fn join(place: Place) -> Result<World, DistError> {
        let timeout = timeout_from_env(Duration::from_secs(300))?;
        let server = if place.hosts_store {
            let port = place.store.rsplit(':').next().unwrap_or("0");
            Some(StoreServer::bind(&format!("0.0.0.0:{port}"))?)
        } else {
            None
        };
        let store = StoreClient::connect(&place.store, timeout)?;
        let ring = RingCollective::join(&store, "ring", place.rank, place.world, timeout)?;
        Ok(World { place, comm: Arc::new(ring), store, _server: server })
    }

    pub fn rank(&self) -> usize {
        self.place.rank
    }

    pub fn size(&self) -> usize {
        self.place.world
    }

    pub fn is_main(&self) -> bool {
        self.place.rank == 0
    }
}

/// This process's share in a data-parallel run: the collective, and
/// whether it is rank 0 (which logs, writes metrics and checkpoints).
#[derive(Clone)]
pub struct Share {
    pub comm: Option<Arc<dyn Collective>>,
    pub rank: usize,
    pub size: usize,
}

impl Share {
    pub fn main(&self) -> bool {
        self.rank == 0
    }

    pub fn failed(e: DistError) -> EngineError {
        EngineError::Runtime(e.to_string())
    }

    /// The sum over the ranks.
    pub fn sum(&self, v: &mut [f64]) -> Result<(), EngineError> {
        match &self.comm {
            Some(c) => c.all_reduce_f64(v, Reduction::Sum).map_err(Share::failed),
            None => Ok(()),
        }
    }

    /// Whether any rank asks to stop (a signal reaches the ranks at
    /// different steps; all stop at the same one).
    pub fn any(&self, flag: bool) -> Result<bool, EngineError> {
        let mut v = [f64::from(u8::from(flag))];
        self.sum(&mut v)?;
        Ok(v[0] > 0.0)
    }

    /// The meter with every rank's counts.
    pub fn meter(&self, m: &AccuracyListMeter) -> Result<AccuracyListMeter, EngineError> {
        let mut counts = m.counts();
        self.sum(&mut counts)?;
        let mut out = m.clone();
        out.set_counts(&counts);
        Ok(out)
    }

    /// Rank 0's values of the float states `names` on every rank.
    pub fn broadcast_states(&self, ex: &mut Executor, names: &[String]) -> Result<(), EngineError> {
        let Some(c) = &self.comm else { return Ok(()) };
        ex.broadcast_states(names, c.as_ref()).map_err(|e| EngineError::Runtime(e.to_string()))
    }

    /// Every rank's rank-local states (`Plan::rank_local_states`), joined
    /// as column blocks in rank order (collective: every rank calls it).
    pub fn gather_local(&self, ex: &Executor) -> Result<HashMap<String, (Vec<usize>, Vec<f32>)>, EngineError> {
        let mut out = HashMap::new();
        let Some(c) = &self.comm else { return Ok(out) };
        for name in ex.plan().rank_local_states() {
            let Some(t) = ex.read_state(&name).map_err(|e| EngineError::Runtime(e.to_string()))? else { continue };
            let (Some(v), [e, l]) = (t.as_f32(), &t.shape[..]) else { continue };
            let all = c.all_gather_f32(v).map_err(Share::failed)?;
            out.insert(name, (vec![*e, l * self.size], join_columns(&all, self.size, *e, *l)));
        }
        Ok(out)
    }

    pub fn attach(&self, ex: &mut Executor) -> Result<(), EngineError> {
        match &self.comm {
            Some(c) => ex.set_collective(c.clone()).map_err(|e| EngineError::Runtime(e.to_string())),
            None => Ok(()),
        }
    }
}

/// `[E, L]` blocks of every rank, gathered in rank order, as one `[E, W*L]`.
fn join_columns(gathered: &[f32], world: usize, e: usize, l: usize) -> Vec<f32> {
    let mut out = vec![0f32; gathered.len()];
    for r in 0..world {
        for row in 0..e {
            out[row * world * l + r * l..][..l].copy_from_slice(&gathered[(r * e + row) * l..][..l]);
        }
    }
    out
}
